"""The study loop: ask → run the trial in its own process → tell, several trials at once.

    python -m sweep run --study sst2 [--gpus 0,1 --trials-per-gpu auto] [--jobs N]

Same study name, same study: a second run resumes it and keeps every finished trial. Each
running trial is a thread of this process that watches its trial process (sweep/trial.py);
sweep/placement.py decides where and when the next one starts. Several sweep processes, on
one host or many, can work one study through a shared storage (PostgreSQL, MySQL, a journal
file): Optuna hands each of them distinct trials.
"""

from __future__ import annotations

import dataclasses
import datetime
import signal
import threading
import time
import warnings

import optuna
from optuna.trial import TrialState
from rich.console import Console

from objectives import OBJECTIVES
from sweep import checks, folders, live, mps, trial_process
from sweep.config import Config, Study
from sweep.errors import ConfigError
from sweep.placement import Placement, learned_peaks
from sweep.results import Status
from sweep.space import suggest
from sweep.tracking import Tracker
from sweep.trial import (
    SHARED_OOM,
    Heartbeat,
    ask,
    is_mine,
    owner_gone,
    run_one,
    upload_pending,
)

MAX_SPARES = 4  # trial processes kept imported ahead per GPU (each holds ~0.6 GiB of RAM)
SPARE_GIB = 1.0  # host memory counted per spare (imports, CUDA libraries mapped) when many start
ORPHANS_EVERY_S = 5.0  # how often the launch loop looks for trials of a sweep that died

console = Console(soft_wrap=True)  # whole lines: the terminal (or a log file) wraps them


def run(
    cfg: Config,
    study_cfg: Study,
    n_trials: int | None,
    timeout_s: float | None,
    storage_url: str | None,
    gpus: list[int] | None = None,
    per_gpu: int | None = 1,  # None: auto, by learned peak memory
    jobs: int = 1,
    mps_mode: str = "auto",
    enqueue: list[dict] | None = None,
) -> None:
    """`enqueue`: configurations (trial params, as stored) to run first, e.g. the best ones
    of another study again with another train.seed."""
    checks.before_run(cfg, study_cfg, storage_url)  # bad input fails here, before any write
    objective = OBJECTIVES[study_cfg.task]
    storage = checks.make_storage(
        storage_url or cfg.storage.optuna, study_cfg.heartbeat_s, study_cfg.retries
    )
    study = open_study(study_cfg, storage, objective)  # the last check: a stored study's task
    for params in enqueue or []:
        study.enqueue_trial(params, skip_if_exists=True)
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
    fail_orphans(study, companion, tracker, study_cfg.retries)
    upload_pending(study, tracker)
    placement = Placement(gpus, per_gpu, jobs, study_cfg.vram_budget_gb,
                          learned_peaks(study.get_trials(deepcopy=False)))  # fmt: skip
    if placement.limit > 1:
        console.print(f"up to {placement.limit} trials at once" + (
            f" on GPUs {','.join(map(str, gpus))}" if gpus else ""))  # fmt: skip
    daemon = None
    if placement.packs_gpus():
        daemon, line = mps.start(mps_mode)
        console.print(line)
        if daemon:
            placement.extra_env = daemon.env
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, trial_process.on_signal)
    workers = Workers()
    total = n_trials or study_cfg.n_trials
    planned = len(study.get_trials(deepcopy=False)) + total
    study.set_user_attr("planned", planned)  # for `status --watch`

    def draw() -> tuple[dict, list[dict]]:
        slots = f"{len(placement.running)}/{placement.limit} slots in use" + (
            f" on GPUs {','.join(map(str, gpus))}" if gpus else "")  # fmt: skip
        return live.header(study, planned, slots), live.BOARD.rows()

    try:
        with live.View(console, draw):
            launch_trials(cfg, study_cfg, study, companion, tracker, placement, workers,
                          total, timeout_s)  # fmt: skip
            workers.join()  # the view stays while the last trials run
    finally:
        workers.join()  # an interrupt stops every trial process; each trial is stored
        trial_process.POOL.close()
        if daemon:
            daemon.stop()  # after its clients, the trial processes, are gone
    workers.raise_first()
    if trial_process.INTERRUPT.is_set():
        tracker.close("KILLED")
        raise KeyboardInterrupt  # after the trials were stored: __main__ prints one line
    tracker.close("FINISHED")


class Workers:
    """The running trials' threads; the first exception of any of them is raised again."""

    def __init__(self):
        self.threads: list[threading.Thread] = []
        self.errors: list[BaseException] = []

    def start(self, target, *args) -> None:
        def body():
            try:
                target(*args)
            except BaseException as err:  # a bug in the sweep: stop the others, report it
                self.errors.append(err)
                trial_process.INTERRUPT.set()

        thread = threading.Thread(target=body, daemon=True)
        thread.start()
        self.threads.append(thread)

    def running(self) -> int:
        self.threads = [t for t in self.threads if t.is_alive()]
        return len(self.threads)

    def join(self) -> None:
        for thread in self.threads:
            while thread.is_alive():
                thread.join(0.5)

    def raise_first(self) -> None:
        if self.errors:
            trial_process.INTERRUPT.clear()
            raise self.errors[0]


def launch_trials(cfg, study_cfg, study, companion, tracker, placement, workers, total: int,
                  timeout_s: float | None) -> None:  # fmt: skip
    """Start up to `total` trials, each when placement has a slot for it, and the retries of
    those that ran out of memory on a shared card (`retried`: they replace their trial)."""
    started, launched, checked = time.monotonic(), 0, time.monotonic()
    warm = study_cfg.worker_trials > 1
    retried: list[int] = []

    def tend(key: tuple[str, str]) -> None:
        trim_spares(placement, total - launched, warm, key)

    while True:
        if launched >= total + len(retried):
            if not workers.running() or trial_process.INTERRUPT.is_set():
                return
            placement.wait(0.2)  # a trial still running may yet be queued again
            continue
        while placement.full() and not trial_process.INTERRUPT.is_set():
            placement.wait(0.2)
        if timeout_s and time.monotonic() - started > timeout_s:
            return
        if trial_process.INTERRUPT.is_set():
            return
        # a sweep that died since we started (Optuna's optimize checks before each trial; with
        # 16 packed trials ending at once that check held up the next launches: every
        # ORPHANS_EVERY_S is soon enough, the heartbeat's grace is longer)
        if time.monotonic() - checked >= ORPHANS_EVERY_S:
            fail_orphans(study, companion, tracker, study_cfg.retries)
            checked = time.monotonic()
        if _grid_done(study):
            if not workers.running():
                console.print("every grid point has run")
                return
            time.sleep(0.5)  # the last points are still running; a retry may come back
            continue
        trial = ask(study)
        params = suggest(trial, study_cfg)
        slot = wait_for_slot(placement, trial, params, tend)
        if slot is None:  # interrupted while waiting: never started
            study.tell(trial, state=TrialState.FAIL)
            return
        where = f" on {slot.where()}" if slot.gpu is not None else ""
        console.print(f"[bold]trial {trial.number}[/]{where} {params}")
        spares = spares_ahead(
            total - launched - 1,
            placement.limit,
            placement.open_slots(slot.gpu, slot.key),
            warm,
            spare_room(),
        )
        workers.start(run_and_report, cfg, study_cfg, trial, params, companion, tracker,
                      placement, slot, spares, retried)  # fmt: skip
        launched += 1


def spare_room() -> int:
    """How many spare processes half of the host's available memory holds."""
    import psutil

    return int(psutil.virtual_memory().available / 1024**3 / 2 / SPARE_GIB)


def spares_ahead(left: int, limit: int, open_slots: int, warm: bool, room: int = 64) -> int:
    """Trial processes to start now for the next trials, their imports overlapping the running
    ones: once the card is full, as many as may start together when several running trials
    end at once (fresh processes), or one (warm workers take most next trials: one for a
    trial of another base); while it is not (`open_slots`: the first wave, where the placement
    lets few trials start until their peaks are known, then many at once), one for each trial
    that may still start. On the H200 the first wave's later trials otherwise started their
    imports only when the card took them: 21 s after the first, 70 s for 32 packed trials
    (docs/bench/README.md, session 15). `room`: at most that many (`spare_room`: host memory)."""
    steady = 1 if warm else min(limit, MAX_SPARES)
    return max(0, min(left, max(steady, min(open_slots, room))))


def trim_spares(placement: Placement, left: int, warm: bool, key: tuple[str, str],
                pool: trial_process.Pool | None = None) -> int:  # fmt: skip
    """While the next trial (of `key`) waits for memory: spares the cards cannot use end (a
    model whose known peak lets fewer trials in than the count limit, e.g. 7B on a 24 GiB
    card), not to hold host memory and import CPU for the whole sweep. How many ended."""
    pool = pool or trial_process.POOL
    ended = 0
    for gpu in placement.gpus or []:
        keep = spares_ahead(left, placement.limit, placement.open_slots(gpu, key), warm)
        ended += pool.trim(placement.slot_env(gpu), keep)
    return ended


def wait_for_slot(placement: Placement, trial: optuna.Trial, params: dict,
                  tend=lambda key: None):  # fmt: skip
    """Wait for room for this trial (beating its heartbeat, so no other sweep takes it for
    dead, and calling `tend` with its key); None if the sweep is interrupted first."""
    key = (params["model"], params.get("method", "qlora"))
    beat = Heartbeat(trial.storage, [trial._trial_id])
    while not trial_process.INTERRUPT.is_set():
        slot = placement.take(key)
        if slot is not None:
            return slot
        beat()
        tend(key)
        placement.wait(0.2)
    return None


def run_and_report(cfg, study_cfg, trial, params, companion, tracker, placement, slot,
                   spares: int, retried: list[int]) -> None:  # fmt: skip
    given = []

    def give(result=None) -> None:  # the slot, once: when the trial is stored, or on an error
        if given:
            return
        given.append(True)
        shared_oom = result is not None and result.error.startswith(SHARED_OOM)
        if shared_oom:
            retried.append(trial.number)  # queued again: its retry runs in this sweep
        oom = shared_oom or (result is not None and result.status == Status.INFEASIBLE)
        held = (
            max(result.peak_memory_gib or 0.0, result.eval_peak_memory_gib or 0.0) if result else 0
        )
        placement.give(slot, held or None, oom)

    try:
        state, _ = run_one(cfg, study_cfg, trial, params, companion, tracker, slot, spares,
                           lambda gib: placement.observe(slot, gib), give)  # fmt: skip
    finally:
        give()
    study = trial.study
    console.print(f"trial {trial.number} {state.name.lower()} {_summary(study, trial.number)}")


def fail_orphans(
    study: optuna.Study, companion: optuna.Study, tracker: Tracker, retries: int = 1
) -> None:
    """Trials left RUNNING by a sweep that died (kill -9, power loss) become FAIL: at once when
    their owner ran on this host and that process is gone (any storage, the journal file
    too), else once their heartbeat is stale (an owner on another host; SQL storages). Each is
    queued again with its parameters (`retries`), and its MLflow run is closed as failed.
    Their trial processes died with that sweep (PR_SET_PDEATHSIG). Run at the start and then
    every `ORPHANS_EVERY_S` while trials launch."""
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    ours = beat_own(running, companion)
    now = datetime.datetime.now()
    # a trial asked a moment ago may still carry the owner it was retried from
    settled = [t for t in running if t.number not in ours and t.datetime_start
               and (now - t.datetime_start).seconds >= 2]  # fmt: skip
    dead = [t for t in settled if owner_gone(t.user_attrs.get("owner"))]
    if dead:
        retry = checks.RetryOrphans(retries)
        for old in dead:
            study._storage.set_trial_state_values(old._trial_id, state=TrialState.FAIL)
            retry(study, study._storage.get_trial(old._trial_id))
        for mirror in mirrors_of(companion, {t.number for t in dead}):
            companion._storage.set_trial_state_values(mirror._trial_id, state=TrialState.FAIL)
    with warnings.catch_warnings():  # "experimental" since Optuna 2.9
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
        optuna.storages.fail_stale_trials(companion)
    failed = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))}
    for old in running:
        if old.number not in failed:
            continue  # still beating: another live sweep process runs it
        console.print(f"trial {old.number}: its sweep died; marked failed, queued again")
        run_id = old.user_attrs.get("mlflow_run_id")
        if run_id:
            tracker.fail_run(run_id, "orphaned: the sweep process died during the trial")


def beat_own(running: list, companion: optuna.Study) -> set[int]:
    """Heartbeats, now, of the running trials this very process runs (their `owner`) and of
    their mirrors; returns their numbers. They are alive whatever their last beat or their
    owner's start time says: neither check may fail them (a sweep with `--jobs 2` in CI
    failed its own trial 0, then crashed storing its result: a beat that lagged past the
    grace on a loaded host, or psutil's start time moving with a clock step)."""
    ours = [t for t in running if is_mine(t.user_attrs.get("owner"))]
    if not ours:
        return set()
    numbers = {t.number for t in ours}
    ids = [t._trial_id for t in ours] + [m._trial_id for m in mirrors_of(companion, numbers)]
    Heartbeat(companion._storage, ids)()  # one storage: the companion lives in the study's
    return numbers


def mirrors_of(companion: optuna.Study, numbers: set[int]) -> list:
    """The running mirror trials (validation losses, for the pruner) of these trial numbers."""
    running = companion.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    return [m for m in running if m.user_attrs.get("trial_number") in numbers]


def open_study(study_cfg: Study, storage, objective) -> optuna.Study:
    """Create or resume; a stored study of the same name must be the same task."""
    sampler = checks.make_sampler(study_cfg.sampler, study=study_cfg)
    directions = [objective.DIRECTION, "minimize"]
    try:
        study = optuna.load_study(study_name=study_cfg.name, storage=storage, sampler=sampler)
        done = len(study.get_trials(deepcopy=False))
        if done and "seed" in study_cfg.sampler.kwargs:
            # a seeded sampler made anew would draw the first trials' configurations again
            # (RandomSampler; TPE's start-up trials): resumed, it continues from another seed
            seeded = dataclasses.replace(
                study_cfg.sampler,
                kwargs=study_cfg.sampler.kwargs | {"seed": study_cfg.sampler.kwargs["seed"] + done},
            )
            study.sampler = checks.make_sampler(seeded, study=study_cfg)
    except KeyError:
        try:
            study = optuna.create_study(
                study_name=study_cfg.name, storage=storage, sampler=sampler, directions=directions
            )
        except optuna.exceptions.DuplicatedStudyError:  # another sweep created it just now
            return open_study(study_cfg, storage, objective)
        study.set_user_attr(folders.KEY, folders.new_key(study_cfg.name))
        study.set_user_attr("task", study_cfg.task)
        study.set_user_attr("metric", objective.METRIC)
        study.set_user_attr("eval_set", objective.eval_set(study_cfg.data.dir))
        with warnings.catch_warnings():  # experimental since Optuna 3.2, still the only way
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([objective.METRIC, "peak_memory_gib"])
        return study
    folders.study_key(study, wait_s=10)  # created a moment ago by another sweep: its key
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
