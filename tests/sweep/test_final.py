"""`sweep final`: the Pareto-optimal trials scored again on more of the evaluation set, the
result stored on the study and in MLflow, and shown by `best` and `report`."""

from __future__ import annotations

import sqlite3

import optuna

from tests.conftest import run_cli, trial_folder, write_config


def test_final_scores_the_front_on_more_rows(tmp_path, tiny_model, shared_data):
    cfg = write_config(tmp_path, tiny_model, shared_data)  # the sweep scores 16 sentences
    out = run_cli("run", "--study", "tiny", "--config", str(cfg), "--n-trials", "2")
    assert out.returncode == 0, out.stderr[-3000:]
    storage = f"sqlite:///{tmp_path}/storage/optuna.db"
    front = optuna.load_study(study_name="tiny", storage=storage).best_trials
    out = run_cli("final", "--study", "tiny", "--config", str(cfg), "--max-examples", "48")
    assert out.returncode == 0, out.stderr[-3000:]
    study = optuna.load_study(study_name="tiny", storage=storage)
    stored = {k: v for k, v in study.user_attrs.items() if k.startswith("final:")}
    assert sorted(stored) == sorted(f"final:{t.number}" for t in front)
    for entry in stored.values():
        assert entry["examples"] == 48 and 0 <= entry["metrics"]["accuracy"] <= 1
        trial_dir = trial_folder(tmp_path, entry["trial"])
        assert (trial_dir / "final").is_dir()  # its files, apart from the trial's own
    assert "final accuracy" in out.stdout and "(n=48)" in out.stdout  # `best`, printed after
    db = sqlite3.connect(tmp_path / "storage" / "mlflow.db")
    logged = db.execute("select count(*) from metrics where key='final_accuracy'").fetchone()
    assert logged[0] == len(front)
    report = run_cli("report", "--study", "tiny", "--config", str(cfg), "--examples", "0")
    assert report.returncode == 0, report.stderr[-3000:]
    assert "final accuracy" in (tmp_path / "storage/reports/tiny/report.md").read_text()


def test_final_on_a_study_without_trials_is_one_line(tmp_path, tiny_model, shared_data):
    cfg = write_config(tmp_path, tiny_model, shared_data)
    storage = f"sqlite:///{tmp_path}/storage/optuna.db"
    (tmp_path / "storage").mkdir()
    study = optuna.create_study(study_name="tiny", storage=storage, directions=["maximize"] * 2)
    study.set_metric_names(["accuracy", "peak_memory_gib"])
    out = run_cli("final", "--study", "tiny", "--config", str(cfg))
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "no complete feasible trial" in out.stderr
