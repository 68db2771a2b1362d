"""MLflow tracking of a study's trials (sweep/tracking.py) on a sqlite store."""

from __future__ import annotations

from sweep import tracking
from sweep.results import Status, TrialResult


def _history(tracker: tracking.Tracker, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in tracker.client.get_metric_history(run_id, key)]


def test_curves_reach_mlflow_in_batches_at_each_validation_and_at_the_end(tmp_path, monkeypatch):
    """Training losses wait for the next validation (or `CURVE_FLUSH_S`) and go with it in one
    batch; what is left goes when the trial finishes, with the result's metrics and tags; the
    parameters are the run's from its start."""
    tracker = tracking.Tracker(f"sqlite:///{tmp_path}/mlflow.db", tmp_path / "art", "s", {})
    run = tracker.start_trial(0, {"r": 8, "lr": 1e-4}, {"trial_dir": str(tmp_path)})
    assert tracker.client.get_run(run).data.params == {"r": "8", "lr": "0.0001"}
    for step in (1, 2):
        tracker.log_event(run, {"event": "train", "step": step, "loss": 3.0 - step, "time": 1.0})
    assert _history(tracker, run, "train_loss") == []  # not one transaction per step
    tracker.log_event(run, {"event": "eval", "step": 2, "val_loss": 1.5})
    assert _history(tracker, run, "train_loss") == [(1, 2.0), (2, 1.0)]
    assert _history(tracker, run, "val_loss") == [(2, 1.5)]
    monkeypatch.setattr(tracking, "CURVE_FLUSH_S", 0.0)  # a long stretch without validation
    tracker.log_event(run, {"event": "train", "step": 3, "loss": 0.5})
    assert _history(tracker, run, "train_loss")[-1] == (3, 0.5)
    monkeypatch.setattr(tracking, "CURVE_FLUSH_S", 60.0)
    tracker.log_event(run, {"event": "train", "step": 4, "loss": 0.25})
    result = TrialResult(
        Status.SUCCESS, metrics={"accuracy": 0.75, "judge_error": "no judge"}, steps=4,
        memory_kind="cpu_rss", error="",
    )  # fmt: skip
    tracker.finish_trial(run, result, tmp_path, "FINISHED")
    data = tracker.client.get_run(run).data
    assert _history(tracker, run, "train_loss")[-1] == (4, 0.25)
    assert data.metrics["accuracy"] == 0.75 and data.metrics["steps"] == 4
    assert data.tags["judge_error"] == "no judge" and data.tags["memory_kind"] == "cpu_rss"
    assert tracker.client.get_run(run).info.status == "FINISHED"
