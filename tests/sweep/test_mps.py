"""The sweep's own CUDA MPS daemon for packed trials (sweep/mps.py), with a stand-in for the
driver's nvidia-cuda-mps-control that logs how it was called (the real one: on the GPU
machine, tests/gpu/pack.sh)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sweep import mps
from sweep.placement import Placement

FAKE = """#!/bin/sh
echo "$* pipe=$CUDA_MPS_PIPE_DIRECTORY log=$CUDA_MPS_LOG_DIRECTORY stdin=$(cat)" >> {log}
exit {status}
"""


@pytest.fixture
def control(tmp_path, monkeypatch):
    """Put a fake control program first on PATH; returns its call log."""
    log = tmp_path / "calls.log"

    def install(status: int = 0) -> Path:
        program = tmp_path / "bin" / mps.CONTROL
        program.parent.mkdir(exist_ok=True)
        program.write_text(FAKE.format(log=log, status=status))
        program.chmod(0o755)
        monkeypatch.setenv("PATH", f"{program.parent}{os.pathsep}{os.environ['PATH']}")
        monkeypatch.delenv(mps.PIPE, raising=False)
        monkeypatch.setattr(mps, "DEFAULT_PIPE", tmp_path / "no-system-daemon")
        return log

    return install


def test_starts_a_private_daemon_and_quits_it(control):
    log = control()
    daemon, line = mps.start("auto")
    assert daemon is not None and "share each GPU" in line
    pipe, logs = Path(daemon.env[mps.PIPE]), Path(daemon.env[mps.LOG])
    assert pipe.is_dir() and logs.is_dir() and len(str(pipe)) < 100  # a UNIX socket path
    assert log.read_text().splitlines() == [f"-d pipe={pipe} log={logs} stdin="]
    daemon.stop()
    assert log.read_text().splitlines()[1] == f" pipe={pipe} log={logs} stdin=quit"
    assert not daemon.root.exists()


def test_packed_slots_carry_the_daemon_to_their_trials(control, monkeypatch):
    from sweep import placement

    monkeypatch.setattr(placement, "card_memory", lambda index: (24.0, 0.0))
    control()
    p = Placement([0], 2, 1, budget_gib=8.0, learned={})
    assert p.packs_gpus() and not Placement([0, 1], 1, 1, 8.0, {}).packs_gpus()
    daemon, _ = mps.start("auto")
    p.extra_env = daemon.env
    slot = p.take(("m", "qlora"))
    assert (
        slot.env()[mps.PIPE] == daemon.env[mps.PIPE] and slot.env()["CUDA_VISIBLE_DEVICES"] == "0"
    )
    daemon.stop()


@pytest.mark.parametrize("case", ["off", "fails", "missing", "running"])
def test_no_daemon_and_one_line_why(control, monkeypatch, case):
    log = control(status=1 if case == "fails" else 0)
    if case == "missing":
        monkeypatch.setenv("PATH", "/nonexistent")
    if case == "running":
        monkeypatch.setenv(mps.PIPE, "/tmp/somebody-elses-mps")
    daemon, line = mps.start("off" if case == "off" else "auto")
    assert daemon is None
    assert {"off": "--mps off", "fails": "could not start", "missing": "not found",
            "running": "already running"}[case] in line  # fmt: skip
    assert log.exists() == (case == "fails")  # only tried when it could be started
