"""Trial processes (sweep/trial_process.py): spares started ahead with their imports done, and
warm workers that keep their base model from one trial to the next."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import threading
import time

import pytest

from sweep import config, trial, trial_process
from sweep.trial_process import Pool
from tests.conftest import parked_worker, write_config


def test_a_spare_outlives_the_thread_that_asked_for_it():
    """PR_SET_PDEATHSIG kills a child when the thread that started it ends: a spare asked for
    by a trial's thread (which ends with that trial) must still live for the next trial."""
    pool = Pool()
    asking = threading.Thread(target=pool.prepare, args=({"OMP_NUM_THREADS": "1"},))
    asking.start()
    asking.join()
    worker = pool.ready({"OMP_NUM_THREADS": "1"}, timeout_s=120)
    time.sleep(1.0)
    assert worker.proc.poll() is None  # alive, waiting for its spec
    assert pool.take({"OMP_NUM_THREADS": "2"}) is None  # another environment: no spare
    pool.close()
    assert worker.proc.wait(timeout=30) == 0  # told there is no trial: exits cleanly


def test_several_spares_for_trials_that_start_together():
    pool = Pool()
    env = {"OMP_NUM_THREADS": "1"}
    pool.prepare(env, 2)
    pool.prepare(env, 2)  # already on their way: no more
    first = pool.ready(env, timeout_s=120)
    deadline = time.monotonic() + 120
    while len(pool.waiting.get(tuple(env.items()), [])) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert pool.take(env) is first
    second = pool.take(env)
    assert second is not None and second is not first
    assert pool.take(env) is None  # two asked for, two given
    for worker in (first, second):
        worker.proc.stdin.close()
        assert worker.proc.wait(timeout=60) == 0
    pool.close()


class _Proc:
    """Stands for a worker's process in the pool's bookkeeping (no subprocess needed)."""

    def __init__(self):
        self.closed = False
        self.stdin = self

    def poll(self):
        return 0 if self.closed else None

    def close(self):
        self.closed = True

    def wait(self, timeout=None):
        return 0


def _idle_worker(pool: Pool, env: dict, key: str) -> trial_process.Worker:
    return parked_worker(pool.idle, _Proc(), env, key)


def test_taking_a_warm_worker_keeps_the_others_of_its_base_and_ends_other_bases():
    """Several trials of one base end together: each next trial takes one of their workers.
    Only workers holding another base end (their GPU memory is the next trial's)."""
    pool, env = Pool(), {"OMP_NUM_THREADS": "1"}
    first, second = _idle_worker(pool, env, "a"), _idle_worker(pool, env, "a")
    other = _idle_worker(pool, env, "b")
    assert pool.take(env, "a") is first
    assert other.proc.closed and not second.proc.closed
    assert pool.take(env, "a") is second
    assert pool.take(env, "a") is None  # no spare either
    third = _idle_worker(pool, env, "a")
    assert pool.take(env, "b") is None and third.proc.closed  # another base: it ends


def test_trim_ends_the_newest_spares_beyond_what_is_kept():
    pool, env = Pool(), {"OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(["sleep", "60"], start_new_session=True) for _ in range(3)]
    spares = [parked_worker(pool.waiting, proc, env) for proc in procs]
    assert pool.trim(env, 1) == 2
    assert pool.waiting[tuple(env.items())] == spares[:1]  # the oldest stays
    assert all(p.wait(timeout=30) is not None for p in procs[1:])  # ended
    assert procs[0].poll() is None
    assert pool.trim(env, 1) == 0 and pool.trim({"OMP_NUM_THREADS": "2"}, 0) == 0
    procs[0].kill()
    procs[0].wait()


@pytest.fixture
def tiny_study(tmp_path, tiny_model, shared_data):
    cfg = config.load(write_config(tmp_path, tiny_model, shared_data), study="tiny")
    return cfg, cfg.studies["tiny"]


def _params(r: int, lr: float, dropout: float) -> dict:
    return {"model": "tiny", "method": "qlora", "r": r, "lora_alpha": 2.0 * r, "lr": lr,
            "dropout": dropout}  # fmt: skip


def _run(study, params: dict, folder, trials: int, prune_at: int = 0):
    """One trial through the pool: (worker, how it ended, its events); pruned at the
    validation of step `prune_at` when given."""
    cfg, study_cfg = study
    folder.mkdir(parents=True)
    spec = trial.write_spec(cfg, study_cfg, params, folder)
    events: list[dict] = []

    def on_event(event: dict) -> bool:
        events.append(event)
        return bool(prune_at) and event["event"] == "eval" and event["step"] == prune_at

    worker = trial_process.launch(spec, {}, trials)
    ended = trial_process.follow(worker, folder / "stdout.log", on_event, timeout_s=300)
    return worker, ended, events


def _result(folder) -> dict:
    return json.loads((folder / "result.json").read_text())


def _untimed(curve: dict) -> dict:
    """The curve without each training step's seconds (wall time differs run to run)."""
    return {**curve, "train": [row[:3] for row in curve["train"]]}


def test_a_warm_worker_trains_as_a_fresh_process(tiny_study, tmp_path):
    """The second trial of a worker, after a trial of another configuration that was pruned,
    runs on the kept base and gives what a process of its own gives: the same loss curve,
    metric and (within 2 %) memory objective."""
    first, second = _params(8, 1e-3, 0.1), _params(4, 5e-4, 0.05)  # dropout: RNG must match
    fresh, ended, _ = _run(tiny_study, second, tmp_path / "fresh", trials=1)
    assert ended == "exited" and fresh.returncode == 0
    trial_process.release(fresh, ended, keep=True)
    assert fresh.proc.wait(timeout=30) == 0  # a one-trial process is gone after its trial

    try:
        worker, ended, _ = _run(tiny_study, first, tmp_path / "pruned", trials=3, prune_at=2)
        assert ended == "stopped" and worker.proc.poll() is None  # abandoned, not killed
        assert not (tmp_path / "pruned" / "result.json").exists()
        trial_process.release(worker, ended, keep=True)
        again, ended, events = _run(tiny_study, second, tmp_path / "warm", trials=3)
        assert again is worker and ended == "exited"
        model = next(e for e in events if e["event"] == "model")
        assert model["base"] == "kept"
        trial_process.release(again, ended, keep=True)
    finally:
        trial_process.POOL.close()
    assert worker.proc.wait(timeout=30) == 0

    warm, alone = _result(tmp_path / "warm"), _result(tmp_path / "fresh")
    assert _untimed(warm["curve"]) == _untimed(alone["curve"])
    assert warm["metrics"] == alone["metrics"]
    assert warm["peak_memory_gib"] == pytest.approx(alone["peak_memory_gib"], rel=0.02)


def test_a_crashed_trial_takes_its_worker_with_it(tiny_study, tmp_path):
    """A trial that fails (here its data folder vanished) ends its worker: no later trial runs
    in a process left in an unknown state; the next one gets a fresh process."""
    cfg, study_cfg = tiny_study
    gone = dataclasses.replace(study_cfg.data, dir=(tmp_path / "gone").resolve())
    bad = (cfg, dataclasses.replace(study_cfg, data=gone))
    try:
        worker, ended, _ = _run(bad, _params(4, 1e-3, 0.0), tmp_path / "crash", trials=3)
        assert ended == "exited" and worker.returncode not in (0, None)
        trial_process.release(worker, ended, keep=False)
        assert worker.proc.poll() is not None and not trial_process.POOL.idle.get(worker.env)
        assert "Traceback" in trial_process.stderr_tail(tmp_path / "crash", 200)
    finally:
        trial_process.POOL.close()


def test_children_share_a_byte_code_cache_where_python_may_not_write_one(tmp_path, monkeypatch):
    """PYTHONDONTWRITEBYTECODE and a package installed without byte code: children get one
    cache folder outside the package, which the first child writes; with the package's own byte
    code, or where Python may write it, the environment stays as it is."""
    package = tmp_path / "site" / "pkgx"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("PYTHONPYCACHEPREFIX", raising=False)
    find = trial_process.bytecode_cache.__wrapped__
    monkeypatch.delenv("PYTHONDONTWRITEBYTECODE", raising=False)
    assert find("pkgx") == {}
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    env = find("pkgx")
    prefix = tmp_path / "cache" / "sweep" / "pycache"
    assert env == {"PYTHONDONTWRITEBYTECODE": "", "PYTHONPYCACHEPREFIX": str(prefix)}
    child = {**os.environ, **env, "PYTHONPATH": str(tmp_path / "site")}
    subprocess.run([sys.executable, "-c", "import pkgx"], env=child, check=True)
    mirrored = prefix / str(package).lstrip("/")  # the cache mirrors the source's folders
    assert [p.name.split(".")[0] for p in mirrored.glob("*.pyc")] == ["__init__"]
    assert not (package / "__pycache__").exists()  # nothing written into the package
    (package / "__pycache__").mkdir()
    assert find("pkgx") == {}
