"""One trial seen from the sweep: spec → child process → pruning → result → Optuna and MLflow.

Pruning: Optuna 5 refuses `report`/`should_prune` in multi-objective studies, so every trial
has a mirror trial in a single-objective companion study (`<study>--val-loss`, minimize) in
the same storage. Each validation loss the child streams is reported to the mirror and the
configured pruner decides on the mirror's history; a pruned trial's process is stopped at once
and both trials are stored as PRUNED with the last validation loss.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import socket
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import optuna
from optuna.trial import TrialState

from sweep import trial_process
from sweep.config import Config, Model, Study
from sweep.placement import Slot
from sweep.results import Status, TrialResult
from sweep.tracking import Tracker

MLFLOW_STATE = {
    TrialState.COMPLETE: "FINISHED",
    TrialState.PRUNED: "KILLED",
    TrialState.FAIL: "FAILED",
}


def run_one(
    cfg: Config,
    study_cfg: Study,
    trial: optuna.Trial,
    params: dict,
    companion: optuna.Study,
    tracker: Tracker,
    slot: Slot | None = None,
    spares: int = 0,
    on_memory: Callable[[float], None] = lambda gib: None,
) -> tuple[TrialState, TrialResult]:
    """Run one trial to its end; `slot` says where (its GPU and CPU threads). `spares`: keep
    that many processes for the next trials started now, so their imports overlap this trial.
    `on_memory` receives the trial's GPU peak so far while it trains."""
    trial_dir = cfg.storage.trials / study_cfg.name / str(trial.number)
    trial_dir.mkdir(parents=True, exist_ok=True)
    spec_path = write_spec(cfg, study_cfg, params, trial_dir)
    mirror = ask(companion)
    mirror.set_user_attr("trial_number", trial.number)
    run_id = tracker.start_trial(trial.number, params, {"trial_dir": str(trial_dir)})
    trial.set_user_attr("mlflow_run_id", run_id)
    trial.set_user_attr("trial_dir", str(trial_dir))
    trial.set_user_attr("host", socket.gethostname())
    if slot is not None and slot.gpu is not None:
        trial.set_user_attr("gpu", slot.gpu)

    watch = Watch(tracker, run_id, mirror, on_memory)
    beat = Heartbeat(trial.storage, [trial._trial_id, mirror._trial_id])
    kills_before = trial_process.oom_kills()
    env = slot.env() if slot else {}
    proc = trial_process.launch(spec_path, env)
    if spares:
        trial_process.SPARES.prepare(env, spares)
    try:
        ended = trial_process.follow(
            proc, trial_dir / "stdout.log", watch, study_cfg.trial_timeout_s, beat
        )
    except BaseException:  # a crash of the sweep itself: the child must not live on
        trial_process.stop(proc)
        raise
    kills_after = trial_process.oom_kills()
    oom_killed = kills_before is not None and kills_after is not None and kills_after > kills_before
    result = outcome(ended, proc.returncode, trial_dir, watch.last, oom_killed)
    state = tell(trial, result, study_cfg.vram_budget_gb)
    if state == TrialState.COMPLETE and result.last_val_loss is not None:
        companion.tell(mirror, result.last_val_loss)
    else:  # pruned, failed, or out of memory before any validation loss
        companion.tell(mirror, state=state if state != TrialState.COMPLETE else TrialState.FAIL)
    tracker.finish_trial(run_id, result, trial_dir, MLFLOW_STATE[state])
    return state, result


def ask(study: optuna.Study) -> optuna.Trial:
    """study.ask(), without Optuna's warning that heartbeats belong to study.optimize: this
    sweep beats from its own loop (Heartbeat below)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Heartbeat of storage is supposed", UserWarning)
        return study.ask()


class Watch:
    """Receives the child's progress events: curves to MLflow, validation losses to the pruner.

    Called for every event; returns True when the trial should be pruned.
    """

    def __init__(self, tracker: Tracker, run_id: str, mirror: optuna.Trial,
                 on_memory: Callable[[float], None] = lambda gib: None):  # fmt: skip
        self.tracker, self.run_id, self.mirror = tracker, run_id, mirror
        self.on_memory = on_memory  # the GPU peak so far, from train events (placement)
        self.last: dict = {}  # the latest validation event, with the training tokens so far

    def __call__(self, event: dict) -> bool:
        self.tracker.log_event(self.run_id, event)
        if event["event"] == "train":
            self.last = {**self.last, "tokens": event.get("tokens", 0)}
            if event.get("gpu_gib"):
                self.on_memory(event["gpu_gib"])
        if event["event"] != "eval":
            return False
        self.last = {**self.last, **event}
        self.mirror.report(event["val_loss"], event["step"])
        return self.mirror.should_prune()


class Heartbeat:
    """Records the running trials' heartbeats (SQL storages with a heartbeat only).

    Optuna's own heartbeat thread lives inside `study.optimize`; this sweep uses ask/tell with
    the trial in another process, so it beats from its own wait loop.
    """

    def __init__(self, storage, trial_ids: list[int]):
        interval = getattr(storage, "get_heartbeat_interval", lambda: None)()
        self.storage, self.trial_ids, self.interval = storage, trial_ids, interval
        self.last = -float("inf")

    def __call__(self) -> None:
        if self.interval and time.monotonic() - self.last >= self.interval / 2:
            for trial_id in self.trial_ids:
                self.storage.record_heartbeat(trial_id)
            self.last = time.monotonic()


def write_spec(cfg: Config, study_cfg: Study, params: dict, trial_dir: Path) -> Path:
    """spec.json for the child; config.json is the resolved study config kept with the trial."""
    model = cfg.models[params["model"]]
    spec = {
        "study": study_cfg.name,
        "task": study_cfg.task,
        "model": model_spec(model),
        "params": params,
        "train": dataclasses.asdict(study_cfg.train),
        "eval": dataclasses.asdict(study_cfg.eval),
        "data_dir": str(study_cfg.data.dir) if study_cfg.data.dir else None,
        "train_set": study_cfg.data.train_set,
        "cache_dir": str(cfg.storage.cache),
        "out_dir": str(trial_dir),
        "vram_budget_gb": study_cfg.vram_budget_gb,
    }
    judge = study_cfg.eval.judge
    judge_alias = judge.get("model") if judge["name"] == "local" else None
    if judge_alias:
        spec["judge_model"] = model_spec(cfg.models[judge_alias])
    resolved = {
        "config_file": str(cfg.path),
        "storage": dataclasses.asdict(cfg.storage),
        "study": dataclasses.asdict(study_cfg),
        "params": params,
    }
    (trial_dir / "config.json").write_text(json.dumps(jsonable(resolved), indent=2))
    path = trial_dir / "spec.json"
    path.write_text(json.dumps(spec, indent=2))
    return path


def model_spec(model: Model) -> dict:
    """A [models] entry as spec.json holds it (what src.models.load_base reads)."""
    return jsonable(dataclasses.asdict(model))


def jsonable(value):
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return str(value) if isinstance(value, Path) else value


def outcome(
    ended: str, returncode: int | None, trial_dir: Path, last: dict, oom_killed: bool = False
) -> TrialResult:
    """The child's result.json if it finished; otherwise why it did not.

    `oom_killed`: the kernel's OOM killer struck during the trial (host memory): a SIGKILLed
    trial is then infeasible like a CUDA out-of-memory one, not failed.
    """
    result_path = trial_dir / "result.json"
    if ended == "exited" and returncode == 0 and result_path.exists():
        return TrialResult.load(result_path)
    val = last.get("val_loss")
    seen = {"steps": last.get("step", 0), "train_tokens": last.get("tokens", 0)}
    if ended == "stopped":
        return TrialResult(Status.PRUNED, last_val_loss=val, **seen)
    if ended == "exited" and returncode == -signal.SIGKILL and oom_killed:
        error = f"oom: killed by the kernel's OOM killer\n{trial_process.stderr_tail(trial_dir)}"
        return TrialResult(Status.INFEASIBLE, error=error, last_val_loss=val)
    error = f"{why(ended, returncode)}\n{trial_process.stderr_tail(trial_dir)}"
    return TrialResult(Status.FAILED, error=error, last_val_loss=val, **seen)


def why(ended: str, returncode: int | None) -> str:
    """The first line of a failed trial's error: its reason."""
    if ended in ("timeout", "interrupted"):
        return ended
    if returncode is not None and returncode < 0:
        name = signal.Signals(-returncode).name
        hint = " (out of host memory, or killed)" if name == "SIGKILL" else ""
        return f"crash: killed by {name}{hint}"
    return f"crash (exit status {returncode})"


def tell(trial: optuna.Trial, result: TrialResult, budget_gib: float) -> TrialState:
    """Values [metric, peak GiB] to Optuna; everything else as user attributes.

    Memory is a constraint as well as an objective: `peak - vram_budget_gb` must stay <= 0.
    A trial over the budget or out of memory is COMPLETE but infeasible, so the sampler
    learns to avoid its region (a FAIL would teach it nothing); its metric value is the
    worst possible (0) and `reason` says why.
    """
    attrs = {
        "status": result.status.value,
        "last_val_loss": result.last_val_loss,
        "steps": result.steps,
        "train_tokens": result.train_tokens,  # a pruned trial's too: what the pruner saved
        "error": result.error[-2000:],
        "reason": result.error.split("\n", 1)[0].split(":", 1)[0] if result.error else "",
    }
    if result.status in (Status.SUCCESS, Status.INFEASIBLE):
        attrs |= {
            "metrics": result.metrics,
            "peak_memory_gib": result.peak_memory_gib,
            "eval_peak_memory_gib": result.eval_peak_memory_gib,
            "memory_kind": result.memory_kind,
            "phases": result.phases,
            "nvml_peak_gib": result.nvml_peak_gib,
            "train_tokens_per_s": result.train_tokens_per_s,
            "trainable_params": result.trainable_params,
            "trainable_pct": result.trainable_pct,
            "wall_seconds": result.wall_seconds,
            "device": result.device,
        }
    for key, value in attrs.items():
        trial.set_user_attr(key, value)
    study = trial.study
    if result.status == Status.SUCCESS:
        metric = result.metrics[study.user_attrs["metric"]]
        if metric is None:  # e.g. no AlpacaEval judge reachable: never a silent substitute
            metric = -result.last_val_loss
            trial.set_user_attr(
                "objective_fallback",
                f"-validation loss ({result.metrics.get('judge_error', 'metric missing')})",
            )
        over = result.peak_memory_gib - budget_gib if budget_gib else 0.0
        trial.set_constraint("vram_budget_gb", over)
        if over > 0:
            trial.set_user_attr("reason", "over_budget")
        study.tell(trial, [metric, result.peak_memory_gib])
        return TrialState.COMPLETE
    if result.status == Status.INFEASIBLE:  # out of memory: as far over the budget as it got
        peak = result.peak_memory_gib or 0.0
        trial.set_constraint("vram_budget_gb", 1.0 + max(0.0, peak - budget_gib))
        study.tell(trial, [0.0, peak])
        return TrialState.COMPLETE
    state = TrialState.PRUNED if result.status == Status.PRUNED else TrialState.FAIL
    study.tell(trial, state=state)
    return state
