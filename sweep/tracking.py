"""MLflow: one experiment and one parent run per study, one child run per trial.

MLflow's own Optuna callback is deprecated and the file store is in maintenance mode, so the
sweep calls MlflowClient directly on a sqlite backend with an explicit artifact location.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from sweep.checks import first_wins
from sweep.results import TrialResult

ROLE_TAG = "sweep.role"
CURVE_FLUSH_S = 5.0  # a running trial's training-loss curve reaches MLflow at least this often
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
        self.curves: dict[str, tuple] = {}  # run id -> (curve points not written yet, since)
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
        self.client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()])
        return run.info.run_id

    def log_event(self, run_id: str, event: dict) -> None:
        """Per-step curves: train loss, validation loss (and accuracy). Kept per run and written
        as one batch at each validation and at least every `CURVE_FLUSH_S`: written one at a
        time, each a store transaction, they were the sweep process's largest cost with 16
        trials at once (a fifth of its busy time in a simulated packed sweep, session 26,
        docs/bench/README.md), and that process hands freed slots to the next trials.
        (MLflow's own async logging cannot serve here: its queue is one per store, and
        `set_terminated` of any run shuts it down under the other runs' feet.) Called from
        the run's own thread only, as `finish_trial`, which writes what is left."""
        names = {"train": "train_loss", "eval": "val_loss", "eval_accuracy": "val_accuracy"}
        name = names.get(event["event"])
        if name is None:
            return
        value = event["loss" if name == "train_loss" else name]
        at = int(event.get("time", time.time()) * 1000)
        points, since = self.curves.setdefault(run_id, ([], time.monotonic()))
        points.append(Metric(name, float(value), at, event["step"]))
        if name != "train_loss" or time.monotonic() - since >= CURVE_FLUSH_S:
            self._write_curves(run_id)

    def _write_curves(self, run_id: str) -> None:
        metrics, _ = self.curves.pop(run_id, ([], None))
        for first in range(0, len(metrics), 1000):  # MLflow's most metrics per batch
            self.client.log_batch(run_id, metrics=metrics[first : first + 1000])

    def finish_trial(self, run_id: str, result: TrialResult, trial_dir: Path, state: str) -> None:
        self._write_curves(run_id)
        numbers = (int, float)
        metrics = {k: v for k, v in result.metrics.items() if isinstance(v, numbers)}
        tags = {k: v[:5000] for k, v in result.metrics.items() if isinstance(v, str)}
        # (strings: e.g. why a judge could not be reached)
        metrics |= {
            "peak_memory_gib": result.peak_memory_gib,
            "eval_peak_memory_gib": result.eval_peak_memory_gib,
            "train_tokens_per_s": result.train_tokens_per_s,
            "trainable_params": result.trainable_params,
            "trainable_pct": result.trainable_pct,
            "wall_seconds": result.wall_seconds,
            "steps": result.steps,
        }
        tags["memory_kind"] = result.memory_kind
        if result.error:  # the reason and the last lines of the trial's stderr
            tags["error"] = result.error[-5000:]
        now = int(time.time() * 1000)
        self.client.log_batch(  # one store transaction, not one per value
            run_id,
            metrics=[Metric(k, v, now, 0) for k, v in metrics.items() if v is not None],
            tags=[RunTag(k, str(v)) for k, v in tags.items()],
        )
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
