"""Run one trial in its own process: spec file in, result file out, progress lines streamed.

GPU memory, crashes and out-of-memory errors stay inside the child; the sweep only reads
its lines and its exit status, and can stop it (pruned, timed out, interrupted).
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from sweep.results import base_key

PREFIX = "SWEEP_PROGRESS "  # must match src/progress.py (which imports torch, so not shared)
PROJECT_ROOT = Path(__file__).resolve().parent.parent
STOP_GRACE_S = 10.0
INTERRUPT = threading.Event()  # set by SIGINT/SIGTERM (see sweep/study.py); checked twice a second


def on_signal(signum, frame) -> None:
    """Signal handler: no exception in the middle of a storage write, just a flag."""
    INTERRUPT.set()


def launch(spec_path: Path, extra_env: dict[str, str] | None = None, trials: int = 1) -> Worker:
    """Start the trial of `spec_path`: in a warm worker that holds its base model, else in a
    spare process (imports done), else in a new one. `trials`: how many trials a new process
    may run before it retires (1: this one only)."""
    env = extra_env or {}
    key = base_key(json.loads(Path(spec_path).read_text()))
    worker = POOL.take(env, key)
    if worker is not None and worker.send(spec_path, key):
        return worker
    if worker is not None:  # it died meanwhile: start afresh
        stop(worker.proc)
    return POOL.start(spec_path, env, trials, key)


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a torch child process (a trial, the benchmark): unbuffered lines,
    and a shared byte-code cache where Python would otherwise compile torch in every child."""
    return {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
            **bytecode_cache(), **(extra or {})}  # fmt: skip


@functools.cache
def bytecode_cache(package: str = "torch") -> dict[str, str]:
    """Where Python may not write byte code (`PYTHONDONTWRITEBYTECODE`, common in container
    images) and `package` was installed without any (`pip install --no-compile`), every trial
    process compiles torch and transformers from source again: on the H200 host that imported
    `src.train_qlora` in 19.8 s against 8.5 s with a cache (docs/bench/README.md, session 17).
    Then the children write and share one cache under the user's cache folder
    (`PYTHONPYCACHEPREFIX`, outside the installed packages): the first compiles, the rest
    read. Elsewhere nothing changes. `find_spec` locates a top-level package without
    importing it (the sweep process never imports torch)."""
    if not os.environ.get("PYTHONDONTWRITEBYTECODE") or os.environ.get("PYTHONPYCACHEPREFIX"):
        return {}
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None or (Path(spec.origin).parent / "__pycache__").is_dir():
        return {}
    home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return {"PYTHONDONTWRITEBYTECODE": "", "PYTHONPYCACHEPREFIX": str(home / "sweep" / "pycache")}


def _key(env: dict[str, str]) -> tuple:
    return tuple(sorted(env.items()))


def _start(
    spec_path: Path | None, extra_env: dict[str, str] | None, trials: int, key: str | None = None
) -> Worker:
    """A trial process; with no spec path, a spare that reads it from stdin once imported.
    `key`: the base key of `spec_path`'s trial."""
    env = child_env(extra_env)
    spare = spec_path is None
    stderr = subprocess.DEVNULL if spare else (spec_path.parent / "stderr.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "src.train_qlora", "--trials", str(trials),
         "-" if spare else str(spec_path)],
        cwd=PROJECT_ROOT,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        start_new_session=True,  # its own process group: stopped as a whole
        preexec_fn=_die_with_parent,
    )  # fmt: skip
    worker = Worker(proc, _key(extra_env or {}), trials)
    if spec_path is not None:  # its first trial, given on the command line
        worker.took(key)
    return worker


class Worker:
    """A trial process seen from the sweep: its progress lines (read by a thread for its whole
    life, across trials), how many trials it may still run, and the base model it holds
    between them (`key`, sweep/results.base_key)."""

    def __init__(self, proc: subprocess.Popen, env: tuple, trials: int):
        self.proc, self.env, self.left = proc, env, trials
        self.key: str | None = None
        self.ended_trial = False  # its current trial ended by "done" or "released"
        self.idle_since = 0.0
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=_read_lines, args=(proc.stdout, self.lines), daemon=True).start()

    @property
    def returncode(self) -> int | None:
        """0 once its trial said "done" (the process lives on or exits by itself), else the
        process's exit status."""
        return 0 if self.ended_trial else self.proc.returncode

    def send(self, spec_path: Path, key: str | None) -> bool:
        """Hand it the trial of `spec_path` (base key `key`); False if it is gone."""
        try:
            self.proc.stdin.write(f"{spec_path}\n")
            self.proc.stdin.flush()
        except (OSError, ValueError):
            return False
        self.took(key)
        return True

    def took(self, key: str | None) -> None:
        """It runs a trial of base `key` now: one fewer left, the base it will hold."""
        self.key, self.left, self.ended_trial = key, self.left - 1, False

    def wait_for(self, events: tuple[str, ...], timeout_s: float, log=None) -> str | None:
        """Read lines until one of `events` (returned), the end of its output or the timeout
        (None); other lines go to `log`."""
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=min(left, 0.5))
            except queue.Empty:
                continue
            if line is None:
                self.lines.put(None)  # the end stays the end for the next reader
                return None
            event = _event(line)
            if event and event.get("event") in events:
                return event["event"]
            if log is not None:
                log.write(line)
        return None


def _event(line: str) -> dict | None:
    return json.loads(line[len(PREFIX) :]) if line.startswith(PREFIX) else None


def release(worker: Worker, ended: str, keep: bool) -> None:
    """After a trial: `keep` a worker whose trial ended cleanly and that may run more (it is
    idle until the next trial of its base takes it), else see it gone."""
    reusable = keep and worker.ended_trial and worker.left > 0 and ended in ("exited", "stopped")
    if reusable and worker.wait_for(("ready",), READY_S) == "ready":
        POOL.park(worker)
        return
    try:  # it exits by itself after its last trial
        worker.proc.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        stop(worker.proc)


READY_S = 60.0  # a worker frees its last trial's memory before it says "ready"
IDLE_S = 10.0  # a warm worker no trial took for this long exits (it holds its base model)


class Pool:
    """Trial processes: spares started ahead per environment (GPU, threads), so that the next
    trials do not wait for Python to import torch, transformers and PEFT (seconds: 7 on this
    project's CPU machine, 17 on the H200 host), and warm workers that finished a trial and
    keep their base model for the next trial of the same base (`[studies.X] worker_trials`).

    Every process is started by one thread that lives as long as the sweep: PR_SET_PDEATHSIG
    kills a child when the *thread* that started it ends, and a trial's own thread ends with
    its trial, long before a spare or a warm worker takes its next trial. The same thread ends
    warm workers left idle for IDLE_S (their GPU memory is not counted by the placement).
    """

    def __init__(self):
        self.waiting: dict[tuple, list[Worker]] = {}  # spares: no trial yet
        self.idle: dict[tuple, list[Worker]] = {}  # warm: a base model loaded
        self.pending: dict[tuple, int] = {}
        self.lock = threading.Lock()
        self.requests: queue.Queue = queue.Queue()
        self.thread: threading.Thread | None = None

    def take(self, env: dict[str, str], key: str | None = None) -> Worker | None:
        """An idle warm worker of this environment holding base `key`, else a spare. Idle
        workers of this environment holding another base end here (their memory is the next
        trial's); the others of base `key` stay idle for the next trials. (Ending those too
        made 9 of 32 packed H200 trials wait 15-19 s for fresh processes while warm workers of
        their base had just been closed: docs/bench/README.md, session 16.)"""
        with self.lock:
            idle = self.idle.pop(_key(env), [])
            same = [w for w in idle if w.key == key and key is not None and w.proc.poll() is None]
            match = same.pop(0) if same else None
            others = [w for w in idle if w is not match and w not in same]
            if same:
                self.idle[_key(env)] = same
            spares = self.waiting.get(_key(env), [])
            while match is None and spares:
                worker = spares.pop(0)
                if worker.proc.poll() is None:
                    match = worker
        for worker in others:
            _close(worker)
        return match

    def park(self, worker: Worker) -> None:
        worker.idle_since = time.monotonic()
        with self.lock:
            self.idle.setdefault(worker.env, []).append(worker)
        self._ensure_thread()

    def start(self, spec_path: Path, env: dict[str, str], trials: int, key: str | None) -> Worker:
        """A new process for `spec_path` (base key `key`), started by the pool's thread."""
        box: queue.Queue = queue.Queue()
        self._ensure_thread()
        self.requests.put((spec_path, env, trials, key, box))
        return box.get()

    def prepare(self, env: dict[str, str], count: int = 1, trials: int = 1) -> None:
        """Have `count` spares ready (or on their way) for the next trials in `env`."""
        key = _key(env)
        with self.lock:
            missing = count - len(self.waiting.get(key, [])) - self.pending.get(key, 0)
            if missing <= 0:
                return
            self.pending[key] = self.pending.get(key, 0) + missing
        self._ensure_thread()
        for _ in range(missing):
            self.requests.put((None, env, trials, None, None))

    def trim(self, env: dict[str, str], keep: int) -> int:
        """End spares of `env` beyond `keep` (the newest first: the least far in their
        imports); how many ended. A spare holds no trial, so it is simply stopped."""
        with self.lock:
            spares = self.waiting.get(_key(env), [])
            extra = spares[keep:]
            del spares[keep:]
        for worker in extra:  # stop() waits for the process: not on the caller's thread
            threading.Thread(target=stop, args=(worker.proc,), daemon=True).start()
        return len(extra)

    def ready(self, env: dict[str, str], timeout_s: float = 600) -> Worker:
        """Wait until a spare for `env` exists and has imported everything (benchmarks)."""
        key, deadline = _key(env), time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self.lock:
                workers = self.waiting.get(key)
                worker = workers[0] if workers else None
            if worker is not None:
                worker.wait_for(("ready",), deadline - time.monotonic())
                return worker
            time.sleep(0.1)
        raise TimeoutError("no spare trial process")

    def _ensure_thread(self) -> None:
        with self.lock:
            if self.thread is None:
                self.thread = threading.Thread(target=self._serve, daemon=True)
                self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                request = self.requests.get(timeout=1.0)
            except queue.Empty:
                self._reap()
                continue
            if request is None:
                return
            spec_path, env, trials, key, box = request
            worker = _start(spec_path, env, trials, key)
            if box is not None:
                box.put(worker)
                continue
            with self.lock:
                self.waiting.setdefault(worker.env, []).append(worker)
                self.pending[worker.env] = max(0, self.pending.get(worker.env, 0) - 1)

    def _reap(self) -> None:
        now, gone = time.monotonic(), []
        with self.lock:
            for env, workers in self.idle.items():
                gone += [w for w in workers if now - w.idle_since > IDLE_S]
                self.idle[env] = [w for w in workers if now - w.idle_since <= IDLE_S]
        for worker in gone:
            _close(worker)

    def close(self) -> None:
        """No more trials: spares and idle workers read the end of their input and exit."""
        with self.lock:
            workers = [w for ws in (*self.waiting.values(), *self.idle.values()) for w in ws]
            self.waiting, self.idle, self.pending = {}, {}, {}
            thread, self.thread = self.thread, None
        for worker in workers:
            _close(worker)
        if thread is not None:
            self.requests.put(None)
            thread.join(timeout=STOP_GRACE_S)


def _close(worker: Worker) -> None:
    """End a worker that waits for a trial: the end of its input, then signals if need be."""
    try:
        worker.proc.stdin.close()
        worker.proc.wait(timeout=STOP_GRACE_S)
    except (OSError, subprocess.TimeoutExpired):
        stop(worker.proc)


POOL = Pool()


def _die_with_parent() -> None:
    """Linux: the kernel kills the trial when the sweep dies, even by SIGKILL (no orphans)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:  # not Linux: Ctrl-C and the sweep's own stop() still apply
        pass


def follow(
    worker: Worker,
    log_path: Path,
    on_event: Callable[[dict], bool],
    timeout_s: float = 0.0,
    tick: Callable[[], None] = lambda: None,
) -> str:
    """Stream the trial's progress events to `on_event` until it ends ("done", or the
    process exits).

    `on_event` returns True to stop the trial (pruned): a worker that may run more trials is
    asked to abandon it (SIGUSR1; it answers "released" at its next step and stays warm), any
    other is stopped. `tick` runs about twice a second (the heartbeat). Returns why it ended:
    "exited", "stopped", "timeout" or "interrupted".
    """
    deadline = time.monotonic() + timeout_s if timeout_s else float("inf")
    with log_path.open("w", buffering=1) as log:  # line-buffered: `tail -f` works
        while True:
            tick()
            if INTERRUPT.is_set():
                stop(worker.proc)
                return "interrupted"
            if time.monotonic() > deadline:  # checked every line: a chatty trial times out too
                stop(worker.proc)
                return "timeout"
            try:
                line = worker.lines.get(timeout=0.5)
            except queue.Empty:
                continue
            if line is None:  # stdout closed: the process is ending
                worker.lines.put(None)
                worker.proc.wait()
                return "exited"
            event = _event(line)
            if event and event["event"] == "ready":  # a spare's or warm worker's, not the trial's
                continue
            log.write(line)
            if event and event["event"] == "done":
                on_event(event)
                worker.ended_trial = True
                return "exited"
            if event and on_event(event):
                return _prune(worker, log)


def _prune(worker: Worker, log) -> str:
    """Stop a pruned trial: a worker with trials left abandons it and stays; else it ends."""
    if worker.left > 0 and worker.proc.poll() is None:
        try:
            worker.proc.send_signal(signal.SIGUSR1)
        except ProcessLookupError:
            pass
        if worker.wait_for(("released", "done"), STOP_GRACE_S * 3, log) is not None:
            worker.ended_trial = True
            return "stopped"
    stop(worker.proc)
    return "stopped"


def _read_lines(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the trial's process group, then SIGKILL what is left after a grace period."""
    for sig, wait_s in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, STOP_GRACE_S)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait_s)
            break
        except subprocess.TimeoutExpired:
            continue


OOM_COUNTERS = (  # cgroup v2, cgroup v1: processes of this cgroup killed by any OOM killer
    Path("/sys/fs/cgroup/memory.events"),
    Path("/sys/fs/cgroup/memory/memory.oom_control"),
)


def oom_kills(counters: tuple[Path, ...] = OOM_COUNTERS) -> int | None:
    """How many processes of our cgroup the kernel's OOM killer has killed (None: unknown).

    Compared before and after a trial, it tells a host out-of-memory SIGKILL (infeasible)
    from any other kill -9 (a failure).
    """
    for path in counters:
        try:
            for line in path.read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        except (OSError, ValueError):
            continue
    return None


def stderr_tail(trial_dir: Path, lines: int = 20) -> str:
    path = trial_dir / "stderr.log"
    if not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
