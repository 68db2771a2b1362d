"""The study loop: ask → run the trial in its own process → tell.

    python -m sweep run --study sst2

Same study name, same study: a second run resumes it and keeps every finished trial.
"""

from __future__ import annotations

import signal
import time
import warnings

import optuna
from optuna.trial import TrialState
from rich.console import Console

from objectives import OBJECTIVES
from sweep import checks, trial_process
from sweep.config import Config, Study
from sweep.errors import ConfigError
from sweep.space import suggest
from sweep.tracking import Tracker
from sweep.trial import ask, run_one

console = Console()


def run(
    cfg: Config,
    study_cfg: Study,
    n_trials: int | None,
    timeout_s: float | None,
    storage_url: str | None,
) -> None:
    checks.before_run(cfg, study_cfg, storage_url)  # bad input fails here, before any write
    objective = OBJECTIVES[study_cfg.task]
    storage = checks.make_storage(
        storage_url or cfg.storage.optuna, study_cfg.heartbeat_s, study_cfg.retries
    )
    study = open_study(study_cfg, storage, objective)  # the last check: a stored study's task
    checks.enable_wal(storage_url or cfg.storage.optuna)
    checks.enable_wal(cfg.storage.mlflow)
    companion = optuna.create_study(
        storage=storage,
        study_name=f"{study_cfg.name}--val-loss",
        pruner=checks.make_pruner(study_cfg.pruner),
        direction="minimize",
        load_if_exists=True,
    )
    tracker = Tracker(
        cfg.storage.mlflow,
        cfg.storage.artifacts,
        study_cfg.name,
        {
            "task": study_cfg.task,
            "metric": objective.METRIC,
            "eval_set": objective.eval_set(study_cfg.data.dir),
        },
    )
    study.set_user_attr("vram_budget_gb", study_cfg.vram_budget_gb)
    fail_orphans(study, companion, tracker)
    started = time.monotonic()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, trial_process.on_signal)
    for _ in range(n_trials or study_cfg.n_trials):
        if timeout_s and time.monotonic() - started > timeout_s:
            break
        if trial_process.INTERRUPT.is_set():
            tracker.close("KILLED")
            raise KeyboardInterrupt
        if _grid_done(study):
            console.print("every grid point has run")
            break
        trial = ask(study)
        params = suggest(trial, study_cfg)
        console.print(f"[bold]trial {trial.number}[/] {params}")
        state = run_one(cfg, study_cfg, trial, params, companion, tracker)
        console.print(f"trial {trial.number} {state.name.lower()} {_summary(study, trial.number)}")
        if trial_process.INTERRUPT.is_set():
            tracker.close("KILLED")
            raise KeyboardInterrupt  # after the trial was stored: __main__ prints one line
    tracker.close("FINISHED")


def fail_orphans(study: optuna.Study, companion: optuna.Study, tracker: Tracker) -> None:
    """Trials left RUNNING by a sweep that died (kill -9, power loss) become FAIL once their
    heartbeat is stale; each is queued again with its parameters (`retries`), and its MLflow
    run is closed as failed. Their trial processes died with that sweep (PR_SET_PDEATHSIG)."""
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    with warnings.catch_warnings():  # "experimental" since Optuna 2.9
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
        optuna.storages.fail_stale_trials(companion)
    for old in running:
        if study.get_trials(deepcopy=False)[old.number].state != TrialState.FAIL:
            continue  # still beating: another live sweep process runs it
        console.print(f"trial {old.number}: its sweep died; marked failed, queued again")
        run_id = old.user_attrs.get("mlflow_run_id")
        if run_id:
            tracker.fail_run(run_id, "orphaned: the sweep process died during the trial")


def open_study(study_cfg: Study, storage, objective) -> optuna.Study:
    """Create or resume; a stored study of the same name must be the same task."""
    sampler = checks.make_sampler(study_cfg.sampler, study=study_cfg)
    directions = [objective.DIRECTION, "minimize"]
    try:
        study = optuna.load_study(study_name=study_cfg.name, storage=storage, sampler=sampler)
    except KeyError:
        study = optuna.create_study(
            study_name=study_cfg.name, storage=storage, sampler=sampler, directions=directions
        )
        study.set_user_attr("task", study_cfg.task)
        study.set_user_attr("metric", objective.METRIC)
        study.set_user_attr("eval_set", objective.eval_set(study_cfg.data.dir))
        with warnings.catch_warnings():  # experimental since Optuna 3.2, still the only way
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([objective.METRIC, "peak_memory_gib"])
        return study
    stored = study.user_attrs.get("task")
    if stored != study_cfg.task:
        raise ConfigError(
            f"stored study {study_cfg.name!r} is task {stored!r}, config says "
            f"{study_cfg.task!r}; use another study name",
            "--study",
        )
    return study


def _grid_done(study: optuna.Study) -> bool:
    if not isinstance(study.sampler, checks.GridInLoop):
        return False
    waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))  # retries
    return not waiting and study.sampler.is_exhausted(study)


def _summary(study: optuna.Study, number: int) -> str:
    trial = study.trials[number]
    if trial.values:
        return f"{study.metric_names[0]}={trial.values[0]:.4f} peak={trial.values[1]:.2f} GiB"
    return f"last val loss={trial.user_attrs.get('last_val_loss')}"
