"""MLflow: one experiment and one parent run per study, one child run per trial.

MLflow's own Optuna callback is deprecated and the file store is in maintenance mode, so the
sweep calls MlflowClient directly on a sqlite backend with an explicit artifact location.
"""

from __future__ import annotations

import logging
from pathlib import Path

from mlflow.tracking import MlflowClient

from sweep.checks import first_wins
from sweep.results import TrialResult

ROLE_TAG = "sweep.role"
# what a trial folder holds besides the adapter: its config, result, error output, and what
# the objective wrote (SQuAD predictions; AlpacaEval model outputs and judge annotations)
TRIAL_FILES = (
    "config.json",
    "result.json",
    "stderr.log",
    "predictions.json",
    "model_outputs.json",
    "annotations.json",
)


class Tracker:
    def __init__(self, tracking_uri: str, artifacts_dir: Path, study: str, tags: dict[str, str]):
        logging.getLogger("alembic").setLevel(logging.WARNING)
        # sweeps started together race to create the store's tables and the experiment
        first_wins(tracking_uri, lambda: self._open(tracking_uri, artifacts_dir, study, tags))

    def _open(self, tracking_uri: str, artifacts_dir: Path, study: str, tags: dict) -> None:
        self.client = MlflowClient(tracking_uri)
        experiment = self.client.get_experiment_by_name(study)
        if experiment is None:
            location = (artifacts_dir / study).as_uri()
            self.experiment_id = self.client.create_experiment(study, artifact_location=location)
        else:
            self.experiment_id = experiment.experiment_id
        self.parent_id = self._parent_run(study, tags)
        self.client.update_run(self.parent_id, status="RUNNING")  # a resumed study runs again

    def _parent_run(self, study: str, tags: dict[str, str]) -> str:
        found = parent_run(self.client, self.experiment_id)
        if found:
            return found
        run = self.client.create_run(
            self.experiment_id, run_name=study, tags={ROLE_TAG: "study", **tags}
        )
        return run.info.run_id

    def close(self, status: str) -> None:
        self.client.set_terminated(self.parent_id, status=status)

    def fail_run(self, run_id: str, reason: str) -> None:
        self.client.set_tag(run_id, "error", reason)
        self.client.set_terminated(run_id, status="FAILED")

    def start_trial(self, number: int, params: dict, tags: dict[str, str]) -> str:
        run = self.client.create_run(
            self.experiment_id,
            run_name=f"trial-{number}",
            tags={ROLE_TAG: "trial", "mlflow.parentRunId": self.parent_id, **tags},
        )
        for key, value in params.items():
            self.client.log_param(run.info.run_id, key, value)
        return run.info.run_id

    def log_event(self, run_id: str, event: dict) -> None:
        """Per-step curves: train loss, validation loss (and accuracy)."""
        if event["event"] == "train":
            self.client.log_metric(run_id, "train_loss", event["loss"], step=event["step"])
        elif event["event"] == "eval":
            self.client.log_metric(run_id, "val_loss", event["val_loss"], step=event["step"])
        elif event["event"] == "eval_accuracy":  # train.val_accuracy
            self.client.log_metric(
                run_id, "val_accuracy", event["val_accuracy"], step=event["step"]
            )

    def finish_trial(self, run_id: str, result: TrialResult, trial_dir: Path, state: str) -> None:
        numbers = (int, float)
        metrics = {k: v for k, v in result.metrics.items() if isinstance(v, numbers)}
        for key, value in result.metrics.items():
            if isinstance(value, str):  # e.g. why a judge could not be reached
                self.client.set_tag(run_id, key, value[:5000])
        metrics |= {
            "peak_memory_gib": result.peak_memory_gib,
            "eval_peak_memory_gib": result.eval_peak_memory_gib,
            "train_tokens_per_s": result.train_tokens_per_s,
            "trainable_params": result.trainable_params,
            "trainable_pct": result.trainable_pct,
            "wall_seconds": result.wall_seconds,
            "steps": result.steps,
        }
        for key, value in metrics.items():
            if value is not None:
                self.client.log_metric(run_id, key, value)
        self.client.set_tag(run_id, "memory_kind", result.memory_kind)
        if result.error:  # the reason and the last lines of the trial's stderr
            self.client.set_tag(run_id, "error", result.error[-5000:])
        for name in TRIAL_FILES:
            if (trial_dir / name).exists():
                self.client.log_artifact(run_id, str(trial_dir / name))
        for weights in ("adapter", "model"):  # LoRA adapter; a fully fine-tuned model
            if (trial_dir / weights).is_dir():
                self.client.log_artifacts(run_id, str(trial_dir / weights), weights)
        self.client.set_terminated(run_id, status=state)


def log_report(tracking_uri: str, study: str, folder: Path) -> str | None:
    """The report's files into the study's parent run (folder report/); its run id, or None
    when the study has no MLflow experiment in this store."""
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(study)
    if experiment is None:
        return None
    run_id = parent_run(client, experiment.experiment_id)
    if run_id:
        client.log_artifacts(run_id, str(folder), "report")
    return run_id


def parent_run(client: MlflowClient, experiment_id: str) -> str | None:
    """The study's parent run in its experiment."""
    found = client.search_runs(
        [experiment_id], filter_string=f"tags.`{ROLE_TAG}` = 'study'", max_results=1
    )
    return found[0].info.run_id if found else None
