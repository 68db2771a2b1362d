"""Two storages, one study name: each keeps its own trial folders (issue 18), and readers
refuse a folder that is not the trial's own."""

from __future__ import annotations

import hashlib
import shutil

import optuna

from tests.conftest import run_cli, write_config


def _digest(folder) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.iterdir())
        if p.name in ("spec.json", "result.json")
    } | {
        "adapter": hashlib.sha256(
            (folder / "adapter" / "adapter_model.safetensors").read_bytes()
        ).hexdigest()
    }


def test_two_storages_never_share_a_trial_folder(tmp_path, tiny_model, shared_data):
    cfg = write_config(tmp_path, tiny_model, shared_data)
    first = f"sqlite:///{tmp_path}/storage/optuna.db"
    other = f"sqlite:///{tmp_path}/other.db"
    base = ["run", "--study", "tiny", "--config", str(cfg), "--n-trials", "1"]
    out = run_cli(*base)
    assert out.returncode == 0, out.stderr[-3000:]
    (mine,) = optuna.load_study(study_name="tiny", storage=first).trials
    folder = tmp_path / "storage" / "trials"
    (study_dir,) = list(folder.iterdir())
    before = _digest(study_dir / "0")
    out = run_cli(*base, "--storage", other, "--set", "space.r=[8]", "--set", "train.seed=7")
    assert out.returncode == 0, out.stderr[-3000:]
    (theirs,) = optuna.load_study(study_name="tiny", storage=other).trials
    assert len(list(folder.iterdir())) == 2  # a folder per study, not per name
    assert _digest(study_dir / "0") == before  # the first study's trial 0 is untouched
    assert mine.user_attrs["trial_dir"] != theirs.user_attrs["trial_dir"]
    # a folder overwritten by another study's trial is refused, not handed out
    export = tmp_path / "export"
    shutil.copy(tmp_path / theirs.user_attrs["trial_dir"] / "spec.json", study_dir / "0")
    out = run_cli(
        "export", "--study", "tiny", "--config", str(cfg), "--trial", "0", "--out", str(export)
    )
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "not its own" in out.stderr and not export.exists()
