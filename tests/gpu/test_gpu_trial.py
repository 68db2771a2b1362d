"""On the GPU machine: one real trial on a random-weight Qwen2.5-0.5B shape records CUDA memory.

pytest -m gpu tests/gpu   (needs SWEEP_GPU_MODEL=<folder from build_random_qwen.py>)
"""

from __future__ import annotations

import os
from pathlib import Path

import optuna
import pytest

from tests.conftest import run_cli, write_config

pytestmark = pytest.mark.gpu


def test_one_trial_on_the_gpu(tmp_path, shared_data):
    model = Path(os.environ["SWEEP_GPU_MODEL"])
    cfg = write_config(tmp_path, model, shared_data)
    out = run_cli(
        "run",
        "--study",
        "tiny",
        "--config",
        str(cfg),
        "--n-trials",
        "1",
        "--set",
        "train.max_steps=20",
        "--set",
        "train.batch_size=16",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    (trial,) = optuna.load_study(
        study_name="tiny", storage=f"sqlite:///{tmp_path}/storage/optuna.db"
    ).trials
    assert trial.state.name == "COMPLETE"
    attrs = trial.user_attrs
    assert attrs["memory_kind"] == "cuda_reserved" and attrs["device"] != "cpu"
    assert attrs["nvml_peak_gib"] and attrs["nvml_peak_gib"] >= attrs["peak_memory_gib"] * 0.9
    assert attrs["train_tokens_per_s"] > 0
