"""`python -m sweep final --study NAME [--top K] [--max-examples N]`: the Pareto-optimal
trials evaluated again on the whole evaluation set (all 872 SST-2 dev sentences, the whole
SQuAD evaluation split, all 805 AlpacaEval instructions with the study's judge), where the
sweep scored them on a subset to save time.

Each trial's adapter is scored in a child process (`python -m src.evaluate_adapter`, torch
stays out of the sweep process); its files go to <trial>/final/. The result is stored on the
study (Optuna refuses to change a finished trial): user attribute `final:<trial number>` =
{metrics, examples, seconds}, and as `final_<metric>` metrics in the trial's MLflow run.
`best` and `report` show it beside the sweep's subset metric.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import optuna

from sweep import folders, trial_process
from sweep.errors import ConfigError

PREFIX = "final:"


def run(study: optuna.Study, tracking_uri: str, top: int, max_examples: int) -> list[dict]:
    """Evaluate the `top` best Pareto-optimal trials (by metric; 0 = all); returns what
    was stored, one dict per trial."""
    if top < 0 or max_examples < 0:
        raise ConfigError("must be >= 0", "--top" if top < 0 else "--max-examples")
    front = sorted(study.best_trials, key=lambda t: -t.values[0])
    if not front:
        raise ConfigError(
            f"study {study.study_name!r} has no complete feasible trial yet", "--study"
        )
    stored = []
    for trial in front[: top or None]:
        folder = Path(trial.user_attrs.get("trial_dir", "/nonexistent"))
        if not any((folder / w).is_dir() for w in ("adapter", "model")):
            raise ConfigError(f"trial {trial.number}'s folder {folder} holds no adapter", "--study")
        if problem := folders.mismatch(folder, trial, study):
            raise ConfigError(f"trial {trial.number}'s folder is not its own: {problem}", "--study")
        print(f"final: trial {trial.number} ({folder})", flush=True)
        started = time.perf_counter()
        metrics = evaluate(folder, max_examples)
        entry = {
            "trial": trial.number,
            "metrics": metrics,
            "examples": metrics.get("eval_examples"),
            "max_examples": max_examples,
            "seconds": round(time.perf_counter() - started, 1),
        }
        study.set_user_attr(f"{PREFIX}{trial.number}", entry)
        log_mlflow(tracking_uri, trial.user_attrs.get("mlflow_run_id"), metrics)
        stored.append(entry)
    return stored


def evaluate(folder: Path, max_examples: int) -> dict:
    """The trial's adapter scored by `python -m src.evaluate_adapter` in a child process."""
    argv = [sys.executable, "-m", "src.evaluate_adapter", str(folder)]
    argv += ["--max-examples", str(max_examples), "--out-folder", "final"]
    done = subprocess.run(
        argv,
        cwd=trial_process.PROJECT_ROOT,
        env=trial_process.child_env(),
        capture_output=True,
        text=True,
    )
    if done.returncode:
        tail = "\n".join(done.stderr.strip().splitlines()[-20:])
        raise SystemExit(f"error: evaluating {folder} failed (exit {done.returncode})\n{tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def log_mlflow(tracking_uri: str, run_id: str | None, metrics: dict) -> None:
    if not run_id:
        return
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    for key, value in metrics.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            client.log_metric(run_id, f"final_{key}", value)


def results(study: optuna.Study) -> dict[int, dict]:
    """{trial number: stored final evaluation} of a study."""
    return {
        int(key.removeprefix(PREFIX)): value
        for key, value in study.user_attrs.items()
        if key.startswith(PREFIX) and key.removeprefix(PREFIX).isdigit()
    }
