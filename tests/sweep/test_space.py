from __future__ import annotations

import optuna
import pytest

from sweep import checks, config
from sweep.errors import ConfigError
from sweep.space import grid, suggest
from tests.conftest import ROOT


def test_alpha_is_a_multiple_of_r():
    study = config.load(ROOT / "sweep.toml").studies["sst2"]
    trial = optuna.trial.FixedTrial(
        {"model": "qwen2.5-1.5b", "r": 16, "alpha_multiple": 4.0, "lr": 2e-4, "dropout": 0.05}
    )
    params = suggest(trial, study)
    assert params == {
        "method": "qlora",  # the one method of the space: recorded, not searched
        "model": "qwen2.5-1.5b",
        "r": 16,
        "lora_alpha": 64.0,
        "lr": 2e-4,
        "dropout": 0.05,
    }


def test_fixed_value_is_not_searched():
    study = config.load(ROOT / "sweep.toml").studies["demo"]
    trial = optuna.trial.FixedTrial(
        {"model": "smollm2-135m", "r": 8, "alpha_multiple": 2.0, "lr": 1e-3}
    )
    assert suggest(trial, study)["dropout"] == 0.0  # dropout = 0.0 in the demo: no suggest call


def test_sampled_values_stay_in_bounds():
    study = config.load(ROOT / "sweep.toml").studies["sst2"]
    opt = optuna.create_study(
        directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(0)
    )
    for _ in range(30):
        params = suggest(opt.ask(), study)
        assert params["r"] in (4, 8, 16, 32, 64)
        assert 1e-5 <= params["lr"] <= 5e-4
        assert params["lora_alpha"] / params["r"] in (0.5, 1.0, 2.0, 4.0)


def test_full_fine_tuning_samples_no_lora_parameters():
    study = config.load(ROOT / "sweep.toml", ['space.method=["qlora", "full"]'], study="sst2")
    trial = optuna.trial.FixedTrial({"method": "full", "model": "qwen2.5-0.5b", "lr_full": 1e-5})
    params = suggest(trial, study.studies["sst2"])
    assert params == {"method": "full", "model": "qwen2.5-0.5b", "lr": 1e-5}


def test_grid_runs_every_combination_once_then_stops():
    study = config.load(ROOT / "sweep.toml").studies["demo-rank-ablation"]
    sampler = checks.make_sampler(study.sampler, study=study)
    opt = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)
    seen = []
    while not sampler.is_exhausted(opt):
        trial = opt.ask()
        seen.append(suggest(trial, study)["r"])
        opt.tell(trial, [0.5, 1.0])  # GridSampler's own after_trial would raise here
    assert sorted(seen) == sorted(study.space.r) and len(seen) >= 3


def test_grid_needs_fixed_floats():
    study = config.load(ROOT / "sweep.toml").studies["sst2"]
    with pytest.raises(ConfigError, match="space.lr"):
        grid(study)
