"""The trial process turns running out of memory into an INFEASIBLE result, not a crash."""

from __future__ import annotations

import json

import pytest
import torch

from src import train_qlora


@pytest.mark.parametrize(
    "error",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        MemoryError(),
        RuntimeError(
            "[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't allocate memory"
        ),
    ],
)
def test_out_of_memory_is_recorded_as_infeasible(tmp_path, monkeypatch, error):
    def run_out(*args):
        raise error

    monkeypatch.setattr(train_qlora, "train_and_evaluate", run_out)
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"out_dir": str(tmp_path), "vram_budget_gb": 24.0}))
    result = train_qlora.main(spec)
    saved = json.loads((tmp_path / "result.json").read_text())
    assert result.status.value == saved["status"] == "infeasible"
    assert saved["error"].startswith("oom: ") and saved["peak_memory_gib"] > 0


def test_other_errors_still_crash(tmp_path, monkeypatch):
    def broken(*args):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(train_qlora, "train_and_evaluate", broken)
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"out_dir": str(tmp_path)}))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        train_qlora.main(spec)
    assert not (tmp_path / "result.json").exists()
