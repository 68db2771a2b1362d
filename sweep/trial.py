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
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path

import optuna
from optuna.trial import TrialState

from sweep import checks, folders, live, trial_process
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
    on_stored: Callable[[TrialResult], None] = lambda result: None,
) -> tuple[TrialState, TrialResult]:
    """Run one trial to its end; `slot` says where (its GPU and CPU threads). `spares`: keep
    that many processes for the next trials started now, so their imports overlap this trial.
    `on_memory` receives the trial's GPU peak so far while it trains; `on_stored` its result
    once it is stored in Optuna and its process is free (the next trial may start while this
    one's files go to MLflow)."""
    trial_dir = folders.trial_folder(cfg.storage.trials, trial.study, trial.number)
    trial_dir.mkdir(parents=True, exist_ok=True)
    belongs = {"study_key": folders.study_key(trial.study), "trial_number": trial.number}
    spec_path = write_spec(cfg, study_cfg, params, trial_dir, belongs)
    kills_before = trial_process.oom_kills()
    env = slot.env() if slot else {}
    # the trial starts first; its bookkeeping below overlaps it (its events wait in the pipe):
    # with 16 packed trials, each ending trial's slot stood idle while it ran
    worker = trial_process.launch(spec_path, env, study_cfg.worker_trials)
    try:
        mirror = ask(companion)
        mirror.set_user_attr("trial_number", trial.number)
        # the study key tells apart runs of same-named studies in other storages (one
        # experiment)
        tags = {"trial_dir": str(trial_dir), "study_key": belongs["study_key"]}
        run_id = tracker.start_trial(trial.number, params, tags)
        trial.set_user_attr("mlflow_run_id", run_id)
        trial.set_user_attr("trial_dir", str(trial_dir))
        trial.set_user_attr("host", socket.gethostname())
        if slot is not None and slot.gpu is not None:
            trial.set_user_attr("gpu", slot.gpu)
        progress = live.Progress(trial.number, params, study_cfg.train.max_steps)
        live.BOARD.add(progress)
        watch = Watch(tracker, run_id, mirror, on_memory, progress, trial)
        beat = Heartbeat(trial.storage, [trial._trial_id, mirror._trial_id])
        if spares:
            trial_process.POOL.prepare(env, spares, study_cfg.worker_trials)
        ended = trial_process.follow(
            worker, trial_dir / "stdout.log", watch, study_cfg.trial_timeout_s, beat
        )
    except BaseException:  # a crash of the sweep itself: the child must not live on
        trial_process.stop(worker.proc)
        raise
    finally:
        live.BOARD.remove(trial.number)
    kills_after = trial_process.oom_kills()
    oom_killed = kills_before is not None and kills_after is not None and kills_after > kills_before
    result = outcome(ended, worker.returncode, trial_dir, watch.last, oom_killed)
    again = shared_oom(result, slot, trial, study_cfg.retries)
    if again:
        result = dataclasses.replace(result, status=Status.FAILED, error=f"{again}\n{result.error}")
    # a worker whose trial succeeded or was pruned keeps its base for the next trial
    trial_process.release(worker, ended, result.status in (Status.SUCCESS, Status.PRUNED))
    try:
        state = stored = tell(trial, result, study_cfg.vram_budget_gb)
    except optuna.exceptions.UpdateFinishedTrialError:  # another sweep ended it meanwhile
        state, (number, stored) = TrialState.FAIL, keep(trial, result, study_cfg.vram_budget_gb)
        again = ""  # that sweep queued it again already
        kept = f"its result is stored as trial {number}" if number is not None else "it failed"
        print(f"trial {trial.number}: another sweep on this storage marked it failed while it "
              f"ran (its heartbeat went stale: a stalled host?); {kept}", flush=True)  # fmt: skip
    if again:  # stored as FAIL above
        checks.RetryOrphans(study_cfg.retries)(
            trial.study, trial.study._storage.get_trial(trial._trial_id)
        )
        print(f"trial {trial.number}: {again.split(': ', 1)[1]}", flush=True)
    # the mirror (validation losses for the pruner) may have been ended with it
    if state == TrialState.COMPLETE and result.last_val_loss is not None:
        companion.tell(mirror, result.last_val_loss, skip_if_finished=True)
    else:  # pruned, failed, or out of memory before any validation loss
        failed = state if state != TrialState.COMPLETE else TrialState.FAIL
        companion.tell(mirror, state=failed, skip_if_finished=True)
    on_stored(result)
    finish_mlflow(
        tracker, trial.study, trial.number, run_id, trial_dir, MLFLOW_STATE[stored], result
    )
    return state, result


SHARED_OOM = "oom_shared"


def shared_oom(result: TrialResult, slot: Slot | None, trial: optuna.Trial, retries: int) -> str:
    """Why a trial that ran out of GPU memory while other trials shared its card is run again
    instead of stored infeasible ("" if it is not such a trial). Packing plans with learned
    peaks x a margin; a configuration that needs more than the learned peak can exhaust the
    card though it would fit its own budget alone, and storing it infeasible would teach the
    sampler a falsehood. The sweep queues it again (`retries`, Optuna's retry callback): the
    OOM reset its model's estimate to the whole budget, so the retry gets its budget's room.
    A retry that runs out of memory again (its `reason`, inherited from the failed attempt,
    says so) or one without retries left is infeasible as usual. The trial's attributes are
    read from storage only for such an OOM, not for every trial."""
    oom = result.status == Status.INFEASIBLE and result.error.startswith("oom: ")
    if not oom or slot is None or slot.gpu is None or not slot.shared:
        return ""
    if "killed by the kernel" in result.error:
        return ""  # host memory (the kernel's OOM killer)
    # retries left (Optuna's callback counts them in `retry_history`), not run again once
    history = trial.storage.get_trial_system_attrs(trial._trial_id).get("retry_history", [])
    if len(history) >= retries or trial.user_attrs.get("reason") == SHARED_OOM:
        return ""
    peak = result.peak_memory_gib or 0.0
    return (f"{SHARED_OOM}: out of GPU memory while other trials shared the card (peak "
            f"{peak:.2f} GiB); queued again with room for its budget")  # fmt: skip


PENDING = "mlflow_pending:"  # study attribute per trial whose MLflow upload failed


def finish_mlflow(
    tracker,
    study,
    number: int,
    run_id: str,
    trial_dir: Path,
    state: str,
    result: TrialResult | None = None,
) -> bool:
    """The trial's metrics and files into its MLflow run. The trial is already stored in
    Optuna with its adapter on disk: a failure here (artifact store gone, tracking server
    down) is said once and recorded on the study, and the next `sweep run` uploads it
    (`upload_pending`); the sweep goes on."""
    try:
        if result is None:  # a later upload: what the trial wrote
            path = trial_dir / "result.json"
            result = TrialResult.load(path) if path.is_file() else TrialResult(Status.FAILED)
        tracker.finish_trial(run_id, result, trial_dir, state)
    except Exception as err:  # noqa: BLE001 - any failure of the upload, said and recorded
        line = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        print(f"trial {number}: MLflow upload failed ({line}); stored in Optuna, adapter in "
              f"{trial_dir}; the next sweep run uploads it", flush=True)  # fmt: skip
        entry = {"run_id": run_id, "trial_dir": str(trial_dir), "state": state, "error": line}
        study.set_user_attr(f"{PENDING}{number}", entry)
        return False
    if study.user_attrs.get(f"{PENDING}{number}"):
        study.set_user_attr(f"{PENDING}{number}", None)
    return True


def upload_pending(study, tracker) -> None:
    """Upload what earlier MLflow failures left out (`finish_mlflow`)."""
    for key, entry in study.user_attrs.items():
        if key.startswith(PENDING) and entry:
            number = int(key.removeprefix(PENDING))
            if finish_mlflow(tracker, study, number, entry["run_id"], Path(entry["trial_dir"]),
                             entry["state"]):  # fmt: skip
                print(f"trial {number}: uploaded to MLflow now", flush=True)


def ask(study: optuna.Study) -> optuna.Trial:
    """study.ask(), without Optuna's warning that heartbeats belong to study.optimize: this
    sweep beats from its own loop (Heartbeat below). The trial is marked as this process's at
    once (`owner`), so no other sweep takes it for an orphan."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Heartbeat of storage is supposed", UserWarning)
        trial = study.ask()
    trial.set_user_attr("owner", owner())
    return trial


class Watch:
    """Receives the child's progress events: curves to MLflow, validation losses to the pruner.

    Called for every event; returns True when the trial should be pruned.
    """

    def __init__(self, tracker: Tracker, run_id: str, mirror: optuna.Trial,
                 on_memory: Callable[[float], None] = lambda gib: None,
                 progress: live.Progress | None = None,
                 trial: optuna.Trial | None = None):  # fmt: skip
        self.tracker, self.run_id, self.mirror = tracker, run_id, mirror
        self.on_memory = on_memory  # the GPU peak so far, from train events (placement)
        self.last: dict = {}  # the latest validation event, with the training tokens so far
        # the live view's row: in this process, and onto the trial for `status --watch`
        self.progress, self.trial, self.written, self.phase = progress, trial, 0.0, None

    def __call__(self, event: dict) -> bool:
        self.tracker.log_event(self.run_id, event)
        if self.progress is not None:
            self.progress.update(event)
            self.share()
        if event["event"] == "train":
            self.last = {**self.last, "tokens": event.get("tokens", 0)}
            if event.get("gpu_gib"):
                self.on_memory(event["gpu_gib"])
        if event["event"] != "eval":
            return False
        self.last = {**self.last, **event}
        self.mirror.report(event["val_loss"], event["step"])
        return self.mirror.should_prune()

    def share(self) -> None:
        """The trial's row onto the storage: at a new phase, else every WRITE_EVERY_S."""
        now = time.monotonic()
        if self.trial is None:
            return
        if self.progress.phase == self.phase and now - self.written < live.WRITE_EVERY_S:
            return
        self.phase, self.written = self.progress.phase, now
        try:
            self.trial.set_user_attr(live.LIVE, self.progress.row())
        except Exception:  # noqa: BLE001 - a busy storage must not stop the trial; next time
            self.written = now - live.WRITE_EVERY_S / 2


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


PROCESS_TOKEN = uuid.uuid4().hex  # this sweep process, whatever the clock does to `started`


def owner() -> dict:
    """Who runs a trial: this host, this sweep process and when it started (a reused pid is
    another process), and a token only this process has (`is_mine`)."""
    import psutil

    me = psutil.Process()
    return {"host": socket.gethostname(), "pid": me.pid, "started": me.create_time(),
            "token": PROCESS_TOKEN}  # fmt: skip


def is_mine(recorded: dict | None) -> bool:
    """Whether this very process owns a trial (the start time psutil reports can move with
    a clock step; the token cannot)."""
    return bool(recorded) and recorded.get("token") == PROCESS_TOKEN


def owner_gone(recorded: dict | None) -> bool:
    """Whether the sweep that owns a trial provably died: it ran on this host and no process
    with its pid and start time exists. Owners on other hosts are left to the heartbeat."""
    import psutil

    if not recorded or recorded.get("host") != socket.gethostname():
        return False
    try:
        started = psutil.Process(recorded["pid"]).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, KeyError):
        return True
    return abs(started - recorded.get("started", started)) > 1.0


def write_spec(
    cfg: Config, study_cfg: Study, params: dict, trial_dir: Path, belongs: dict | None = None
) -> Path:
    """spec.json for the child; config.json is the resolved study config kept with the trial.
    `belongs`: the study key and trial number the folder belongs to (sweep/folders.py)."""
    model = cfg.models[params["model"]]
    spec = {
        **(belongs or {}),
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


@dataclasses.dataclass
class Verdict:
    """What Optuna stores of a trial's result (`tell` puts it on the running trial)."""

    state: TrialState
    attrs: dict
    values: list[float] | None = None
    constraint: float | None = None  # `vram_budget_gb`: feasible when <= 0


def verdict(result: TrialResult, budget_gib: float, metric_name: str) -> Verdict:
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
    if result.status == Status.FAILED and result.metrics:  # measured, then e.g. not saved
        attrs["metrics"] = result.metrics
    if result.status == Status.SUCCESS:
        metric = result.metrics[metric_name]
        if metric is None:  # e.g. no AlpacaEval judge reachable: never a silent substitute
            metric = -result.last_val_loss
            why_missing = result.metrics.get("judge_error", "metric missing")
            attrs["objective_fallback"] = f"-validation loss ({why_missing})"
        over = result.peak_memory_gib - budget_gib if budget_gib else 0.0
        if over > 0:
            attrs["reason"] = "over_budget"
        return Verdict(TrialState.COMPLETE, attrs, [metric, result.peak_memory_gib], over)
    if result.status == Status.INFEASIBLE:  # out of memory: as far over the budget as it got
        peak = result.peak_memory_gib or 0.0
        over = 1.0 + max(0.0, peak - budget_gib)
        return Verdict(TrialState.COMPLETE, attrs, [0.0, peak], over)
    return Verdict(TrialState.PRUNED if result.status == Status.PRUNED else TrialState.FAIL, attrs)


def tell(trial: optuna.Trial, result: TrialResult, budget_gib: float) -> TrialState:
    """The result onto the running trial (`verdict`)."""
    study = trial.study
    judged = verdict(result, budget_gib, study.user_attrs.get("metric", ""))
    for key, value in judged.attrs.items():
        trial.set_user_attr(key, value)
    if judged.constraint is not None:
        trial.set_constraint("vram_budget_gb", judged.constraint)
    study.tell(trial, judged.values, state=judged.state if judged.values is None else None)
    return judged.state


def keep(
    trial: optuna.Trial, result: TrialResult, budget_gib: float
) -> tuple[int | None, TrialState]:
    """Store the result of a trial that another sweep on the same storage already ended (it
    judged this one dead: its heartbeat went stale while this host stalled, so it failed the
    trial and queued its parameters again) as a trial of its own: a finished result is never
    lost, and the sweep goes on. Optuna cannot reopen a finished trial; `add_trial` is its way
    to store one that ran elsewhere. Returns the new trial's number (None: nothing to keep) and
    state."""
    study = trial.study
    judged = verdict(result, budget_gib, study.user_attrs.get("metric", ""))
    if judged.state == TrialState.FAIL:  # the other sweep's FAIL says as much
        return None, TrialState.FAIL
    attrs = trial.user_attrs | judged.attrs | {"taken_over_from": trial.number}
    constraints = {} if judged.constraint is None else {"vram_budget_gb": judged.constraint}
    frozen = optuna.trial.create_trial(
        state=judged.state, values=judged.values, params=trial.params,
        distributions=trial.distributions, user_attrs=attrs, constraints=constraints,
    )  # fmt: skip
    study.add_trial(frozen)  # returns nothing; other sweeps may add trials meanwhile
    kept = [t for t in study.get_trials(deepcopy=False, states=(judged.state,))
            if t.user_attrs.get("taken_over_from") == trial.number]  # fmt: skip
    return kept[-1].number, judged.state
