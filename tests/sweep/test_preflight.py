"""What a trial needs after its training starts is checked before the first trial: one line
naming it, exit status 2, nothing stored (issue 17, item 4)."""

from __future__ import annotations

import shutil

import pytest

from objectives import judges
from sweep.__main__ import main
from tests.sweep.test_cli import _snapshot, fake_project


@pytest.fixture
def project(tmp_path, shared_data):
    cfg, model = fake_project(tmp_path, shared_data)
    return tmp_path, cfg, model


def _refused(folder, cfg, capsys, *sets: str) -> str:
    before = _snapshot(folder)
    argv = ["run", "--config", str(cfg), "--study", "tiny"]
    argv += [a for s in sets for a in ("--set", s)]
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert _snapshot(folder) == before
    return lines[0]


def _alpacaeval_data(tmp_path, shared_data, annotations: bool):
    data = tmp_path / "data"
    for name in ("alpacaeval/alpaca_eval.jsonl", "alpaca/alpaca_data_5000.json.xz"):
        (data / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(shared_data / name, data / name)
    outputs = data / "alpacaeval/model_outputs"
    outputs.mkdir(parents=True)
    shutil.copy(shared_data / f"alpacaeval/model_outputs/{judges.REFERENCE}.json.xz", outputs)
    if annotations:
        pool = data / "alpacaeval/annotations/weighted_alpaca_eval_gpt4_turbo"
        pool.mkdir(parents=True)
        first = sorted((shared_data / pool.relative_to(data)).glob("*.json*"))[0]
        shutil.copy(first, pool)
    return data


def test_model_without_chat_template(project, capsys):
    folder, cfg, model = project
    (model / "chat_template.jinja").unlink()
    line = _refused(folder, cfg, capsys)
    assert "models.tiny.path" in line and "no chat template" in line


def test_alpacaeval_without_annotation_files(project, shared_data, capsys):
    folder, cfg, _ = project
    data = _alpacaeval_data(folder, shared_data, annotations=False)
    line = _refused(folder, cfg, capsys, 'task="alpacaeval"', f'data.dir="{data}"')
    assert "studies.tiny.data.dir" in line and "no annotation files" in line


def test_alpacaeval_without_the_judge_prompt(project, shared_data, capsys, monkeypatch):
    folder, cfg, _ = project
    data = _alpacaeval_data(folder, shared_data, annotations=True)
    monkeypatch.setattr(judges, "TEMPLATE", "alpaca_eval/no/such/prompt.txt")
    line = _refused(folder, cfg, capsys, 'task="alpacaeval"', f'data.dir="{data}"')
    assert "studies.tiny.eval.judge" in line and "judge prompt" in line


def test_alpacaeval_with_everything_passes_the_checks(project, shared_data):
    from sweep import checks, config

    folder, cfg, _ = project
    data = _alpacaeval_data(folder, shared_data, annotations=True)
    loaded = config.load(cfg, ['task="alpacaeval"', f'data.dir="{data}"'], study="tiny")
    checks.before_run(loaded, loaded.studies["tiny"], None)  # raises on any problem


def test_unwritable_trial_folder(project, capsys):
    """Trial folders under a path that is a file (what root's permissions cannot wave
    through, unlike a read-only folder)."""
    folder, cfg, _ = project
    (folder / "not-a-folder").write_text("a file")
    cfg.write_text(cfg.read_text() + f'\n[storage]\ntrials = "{folder}/not-a-folder/trials"\n')
    line = _refused(folder, cfg, capsys)
    assert "cannot write" in line and "not-a-folder" in line


def test_a_misspelt_cuda_wait_mode_in_the_environment(project, capsys, monkeypatch):
    folder, cfg, _ = project
    monkeypatch.setenv("SWEEP_CUDA_WAIT", "blocking")
    line = _refused(folder, cfg, capsys)
    assert "SWEEP_CUDA_WAIT" in line and "did you mean 'block'" in line
