"""Run one trial in its own process: spec file in, result file out, progress lines streamed.

GPU memory, crashes and out-of-memory errors stay inside the child; the sweep only reads
its lines and its exit status, and can stop it (pruned, timed out, interrupted).
"""

from __future__ import annotations

import ctypes
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

PREFIX = "SWEEP_PROGRESS "  # must match src/progress.py (which imports torch, so not shared)
PROJECT_ROOT = Path(__file__).resolve().parent.parent
STOP_GRACE_S = 10.0
INTERRUPT = threading.Event()  # set by SIGINT/SIGTERM (see sweep/study.py); checked twice a second


def on_signal(signum, frame) -> None:
    """Signal handler: no exception in the middle of a storage write, just a flag."""
    INTERRUPT.set()


def launch(spec_path: Path, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start the trial of `spec_path`: in a spare process when one waits (imports done),
    else in a new one."""
    spare = SPARES.take(extra_env or {})
    if spare is not None:
        try:
            spare.stdin.write(f"{spec_path}\n")
            spare.stdin.close()
            return spare
        except OSError:  # it died meanwhile: start afresh
            stop(spare)
    return _start(spec_path, extra_env)


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a torch child process (a trial, the benchmark): unbuffered lines."""
    return {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
            **(extra or {})}  # fmt: skip


def _key(env: dict[str, str]) -> tuple:
    return tuple(sorted(env.items()))


def _start(spec_path: Path | None, extra_env: dict[str, str] | None) -> subprocess.Popen:
    """A trial process; with no spec path, a spare that reads it from stdin once imported."""
    env = child_env(extra_env)
    spare = spec_path is None
    stderr = subprocess.DEVNULL if spare else (spec_path.parent / "stderr.log").open("w")
    return subprocess.Popen(
        [sys.executable, "-m", "src.train_qlora", "-" if spare else str(spec_path)],
        cwd=PROJECT_ROOT,
        env=env,
        stdin=subprocess.PIPE if spare else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        start_new_session=True,  # its own process group: stopped as a whole
        preexec_fn=_die_with_parent,
    )


class Spares:
    """Trial processes started ahead per environment (GPU, threads), so that the next trials
    do not wait for Python to import torch, transformers and PEFT (seconds: 7 on this
    project's CPU machine, 17 on the H200 host). Each still runs exactly one trial.

    Spares are started by one thread that lives as long as the sweep: PR_SET_PDEATHSIG
    kills a child when the *thread* that started it ends, and a trial's own thread ends with
    its trial, long before another trial takes the spare it would have started.
    """

    def __init__(self):
        self.waiting: dict[tuple, list[subprocess.Popen]] = {}
        self.pending: dict[tuple, int] = {}
        self.lock = threading.Lock()
        self.requests: queue.Queue = queue.Queue()
        self.thread: threading.Thread | None = None

    def take(self, env: dict[str, str]) -> subprocess.Popen | None:
        with self.lock:
            procs = self.waiting.get(_key(env), [])
            while procs:
                proc = procs.pop(0)
                if proc.poll() is None:
                    return proc
        return None

    def prepare(self, env: dict[str, str], count: int = 1) -> None:
        """Have `count` spares ready (or on their way) for the next trials in `env`."""
        key = _key(env)
        with self.lock:
            missing = count - len(self.waiting.get(key, [])) - self.pending.get(key, 0)
            if missing <= 0:
                return
            self.pending[key] = self.pending.get(key, 0) + missing
            if self.thread is None:
                self.thread = threading.Thread(target=self._start_spares, daemon=True)
                self.thread.start()
        for _ in range(missing):
            self.requests.put(env)

    def ready(self, env: dict[str, str], timeout_s: float = 600) -> subprocess.Popen:
        """Wait until a spare for `env` exists and has imported everything (benchmarks)."""
        key, deadline = _key(env), time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self.lock:
                procs = self.waiting.get(key)
                proc = procs[0] if procs else None
            if proc is not None:
                proc.stdout.readline()  # its first line, "ready", comes after the imports
                return proc
            time.sleep(0.1)
        raise TimeoutError("no spare trial process")

    def _start_spares(self) -> None:
        while (env := self.requests.get()) is not None:
            proc = _start(None, env)
            key = _key(env)
            with self.lock:
                self.waiting.setdefault(key, []).append(proc)
                self.pending[key] = max(0, self.pending.get(key, 0) - 1)

    def close(self) -> None:
        """No more trials: the spares read an empty line and exit."""
        with self.lock:
            spares = [proc for procs in self.waiting.values() for proc in procs]
            self.waiting, self.pending = {}, {}
            thread, self.thread = self.thread, None
        for proc in spares:
            try:
                proc.stdin.close()
                proc.wait(timeout=STOP_GRACE_S)
            except (OSError, subprocess.TimeoutExpired):
                stop(proc)
        if thread is not None:
            self.requests.put(None)
            thread.join(timeout=STOP_GRACE_S)


SPARES = Spares()


def _die_with_parent() -> None:
    """Linux: the kernel kills the trial when the sweep dies, even by SIGKILL (no orphans)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:  # not Linux: Ctrl-C and the sweep's own stop() still apply
        pass


def follow(
    proc: subprocess.Popen,
    log_path: Path,
    on_event: Callable[[dict], bool],
    timeout_s: float = 0.0,
    tick: Callable[[], None] = lambda: None,
) -> str:
    """Stream `proc`'s progress events to `on_event` until it exits.

    `on_event` returns True to stop the trial (pruned); `tick` runs about twice a second (the
    heartbeat). Returns why it ended: "exited", "stopped", "timeout" or "interrupted".
    """
    lines: queue.Queue = queue.Queue()
    reader = threading.Thread(target=_read_lines, args=(proc.stdout, lines), daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout_s if timeout_s else float("inf")
    with log_path.open("w", buffering=1) as log:  # line-buffered: `tail -f` works
        while True:
            tick()
            if INTERRUPT.is_set():
                stop(proc)
                return "interrupted"
            if time.monotonic() > deadline:  # checked every line: a chatty trial times out too
                stop(proc)
                return "timeout"
            try:
                line = lines.get(timeout=0.5)
            except queue.Empty:
                continue
            if line is None:  # stdout closed: the process is ending
                proc.wait()
                return "exited"
            log.write(line)
            if line.startswith(PREFIX) and on_event(json.loads(line[len(PREFIX) :])):
                stop(proc)
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
