"""Where the next trial runs, and how many run at once (`--gpus`, `--trials-per-gpu`, `--jobs`).

`--trials-per-gpu auto` packs trials onto GPUs by their expected peak memory: the largest
peak recorded by the study's trials of the same model and method, times a safety margin.
A model not seen yet is expected to need the whole memory budget (each trial caps itself to
it) plus room for its CUDA context to grow, so packing starts conservatively; it tightens as soon
as the first trials report their peak after a training step (progress events), and again
when they finish. A trial that runs out of memory anyway resets its model's estimate; if it
shared its card (`Slot.shared`), the card may have run out rather than the trial's own
budget, so the sweep runs it again (sweep/trial.py, `shared_oom`).
The sweep process never imports torch: card sizes come from NVML (nvidia-ml-py) or
`nvidia-smi`.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import subprocess
import threading

from sweep import rows
from sweep.errors import ConfigError, unknown

GIB = 1024**3
MARGIN = 1.25  # expected peak = learned peak x this
# room above the budget for a model not seen yet: a trial caps its allocator at the budget
# minus the CUDA context it measured at the start, and the context grows after that
# (kernels loaded lazily, cuBLAS workspaces)
CONTEXT_GIB = 1.0
CUDA_WAIT = "SWEEP_CUDA_WAIT"  # how a trial process waits for its GPU (src/speed.cuda_waits)
CUDA_WAIT_MODES = ("block", "spin", "yield", "auto")


@dataclasses.dataclass(eq=False)  # one object per running trial
class Slot:
    gpu: int | None  # None: not pinned (CPU jobs, or one trial on the default GPU)
    estimate_gib: float  # what it is expected to hold at its peak; lowered by observe()
    key: tuple[str, str]  # (model, method)
    threads: int | None = None  # CPU threads per trial when several share the host
    extra: dict[str, str] = dataclasses.field(default_factory=dict)  # e.g. the MPS daemon's
    shared: bool = False  # another trial ran on its GPU at some time while it ran

    def env(self) -> dict[str, str]:
        """Environment of the trial process: its GPU, its share of the CPU cores, and what
        the sweep adds (sweep/mps.py)."""
        env = dict(self.extra)
        if self.gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(self.gpu)
        if self.threads:
            env["OMP_NUM_THREADS"] = str(self.threads)
        if self.threads and self.gpu is not None:
            # GPU trials sharing the host sleep while they wait for their card instead of
            # each spinning a core (src/speed.cuda_waits); the user's own setting wins
            env.setdefault(CUDA_WAIT, os.environ.get(CUDA_WAIT, "block"))
        return env

    def where(self) -> str:
        return socket.gethostname() + ("" if self.gpu is None else f":gpu{self.gpu}")


def check_cuda_wait() -> None:
    """The user's `SWEEP_CUDA_WAIT`, if set, is one the trial processes know."""
    wait = os.environ.get(CUDA_WAIT)
    if wait is not None and wait not in CUDA_WAIT_MODES:
        raise unknown("mode", wait, CUDA_WAIT_MODES, CUDA_WAIT)


def card_memory(index: int) -> tuple[float, float] | None:
    """(total, used) GiB of GPU `index`, or None when neither NVML nor nvidia-smi answers."""
    try:
        import pynvml

        pynvml.nvmlInit()
        info = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(index))
        return info.total / GIB, info.used / GIB
    except Exception:  # not installed, no driver: try the command line
        pass
    if not shutil.which("nvidia-smi"):
        return None
    out = subprocess.run(
        ["nvidia-smi", f"--id={index}", "--query-gpu=memory.total,memory.used",
         "--format=csv,noheader,nounits"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    try:
        total, used = (float(v) / 1024 for v in out.stdout.strip().split(","))
    except ValueError:
        return None
    return total, used


class Placement:
    """Hands out slots; thread-safe (each running trial is a thread of the sweep)."""

    def __init__(
        self,
        gpus: list[int] | None,
        per_gpu: int | None,  # None: auto (by memory)
        jobs: int,
        budget_gib: float,
        learned: dict[tuple[str, str], float],
        cores: int | None = None,
    ):
        self.gpus, self.per_gpu, self.jobs, self.budget = gpus, per_gpu, jobs, budget_gib
        self.learned = dict(learned)
        self.running: list[Slot] = []
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)  # notified when a slot is given back
        cores = cores or os.cpu_count() or 1
        self.room: dict[int, float] = {}
        for gpu in gpus or []:
            memory = card_memory(gpu)
            if memory is None and per_gpu is None:
                raise ConfigError(f"GPU {gpu}: no memory figure from NVML or nvidia-smi", "--gpus")
            total, used = memory or (0.0, 0.0)
            self.room[gpu] = total - used  # what other processes already hold stays theirs
        self.limit = self._limit(cores)
        self.threads = max(1, cores // self.limit) if self.limit > 1 else None
        self.extra_env: dict[str, str] = {}  # given to every trial process

    def packs_gpus(self) -> bool:
        """More trials at once than GPUs: some share a card."""
        return bool(self.gpus) and self.limit > len(self.gpus)

    def _limit(self, cores: int) -> int:
        if not self.gpus:
            return self.jobs
        if self.per_gpu is not None:
            return self.per_gpu * len(self.gpus)
        return max(len(self.gpus), cores)  # auto: a trial keeps one core busy launching kernels

    def estimate(self, key: tuple[str, str]) -> float:
        if key in self.learned:
            return self.learned[key] * MARGIN
        any_gpu = max(self.room.values(), default=0.0)
        return (self.budget or any_gpu) + CONTEXT_GIB

    def wait(self, timeout_s: float) -> None:
        """Sleep until a slot is given back, at most `timeout_s` (the next trial starts at
        once, not at the next poll)."""
        with self.changed:
            self.changed.wait(timeout_s)

    def full(self) -> bool:
        with self.lock:
            return len(self.running) >= self.limit

    def take(self, key: tuple[str, str]) -> Slot | None:
        """A slot for a trial of `key`, or None: wait for a running trial to finish."""
        with self.lock:
            if len(self.running) >= self.limit:
                return None
            if not self.gpus:
                slot = Slot(None, 0.0, key, self.threads, self.extra_env)
            else:
                gpu = self._pick(key)
                if gpu is None:
                    return None
                slot = Slot(gpu, self.estimate(key) if self.per_gpu is None else 0.0, key,
                            self.threads, self.extra_env)  # fmt: skip
                neighbours = [s for s in self.running if s.gpu == gpu]
                for other in neighbours:
                    other.shared = True
                slot.shared = bool(neighbours)
            self.running.append(slot)
            return slot

    def _pick(self, key: tuple[str, str]) -> int | None:
        counts = {g: sum(s.gpu == g for s in self.running) for g in self.gpus}
        if self.per_gpu is not None:
            gpu = min(self.gpus, key=lambda g: counts[g])
            return gpu if counts[gpu] < self.per_gpu else None
        need = self.estimate(key)
        free = {g: self._free(g) for g in self.gpus}
        gpu = max(self.gpus, key=lambda g: (free[g], -counts[g]))
        if free[gpu] >= need or counts[gpu] == 0:  # an idle card always takes one trial
            return gpu
        return None

    def open_slots(self, gpu: int | None, key: tuple[str, str] | None = None) -> int:
        """How many more trials may run at once next to the running ones on `gpu`: its share
        of the count limit, and, once a peak of `key`'s model is known (packing by memory),
        no more than that many of them fit in the card's free memory."""
        with self.lock:
            if not self.gpus or gpu is None:
                return max(0, self.limit - len(self.running))
            share = max(1, self.limit // len(self.gpus))
            count = max(0, share - sum(s.gpu == gpu for s in self.running))
            if key not in self.learned or self.per_gpu is not None:
                return count
            return min(count, max(0, int(self._free(gpu) // self.estimate(key))))

    def _free(self, gpu: int) -> float:
        """GiB of `gpu` not expected to be held by its running trials (caller holds the lock)."""
        return self.room[gpu] - sum(s.estimate_gib for s in self.running if s.gpu == gpu)

    def slot_env(self, gpu: int | None) -> dict[str, str]:
        """The environment a trial on `gpu` gets (spares are kept per environment)."""
        return Slot(gpu, 0.0, ("", ""), self.threads, self.extra_env).env()

    def observe(self, slot: Slot, peak_gib: float) -> None:
        """A running trial reports its peak so far: expect that (x margin) of it and of the
        next trials of its model, instead of the conservative first guess."""
        with self.lock:
            self.learned[slot.key] = max(self.learned.get(slot.key, 0.0), peak_gib)
            if slot.estimate_gib:
                slot.estimate_gib = self.learned[slot.key] * MARGIN

    def give(self, slot: Slot, peak_gib: float | None, out_of_memory: bool) -> None:
        """The trial of `slot` ended; learn its peak (and be careful after an OOM)."""
        with self.lock:
            self.running.remove(slot)
            if out_of_memory:  # back to the conservative guess for this model
                self.learned.pop(slot.key, None)
            elif peak_gib:
                self.learned[slot.key] = max(self.learned.get(slot.key, 0.0), peak_gib)
            self.changed.notify_all()


def learned_peaks(trials) -> dict[tuple[str, str], float]:
    """Largest recorded GPU peak per (model, method) among a study's finished trials
    (training's or evaluation's, whichever is larger)."""
    peaks: dict[tuple[str, str], float] = {}
    for trial in trials:
        attrs = trial.user_attrs
        if attrs.get("status") != "success" or not str(attrs.get("memory_kind")).startswith("cuda"):
            continue
        key = (trial.params.get("model"), rows.method(trial))
        # a trial holds the card through its evaluation too: plan with the larger peak
        held = max(attrs.get("peak_memory_gib") or 0.0, attrs.get("eval_peak_memory_gib") or 0.0)
        peaks[key] = max(peaks.get(key, 0.0), held)
    return peaks


def parse_gpus(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        gpus = [int(g) for g in text.split(",") if g.strip()]
    except ValueError:
        gpus = []
    if not gpus or len(set(gpus)) != len(gpus) or min(gpus) < 0:
        raise ConfigError(f"expected GPU indices like 0,1 (got {text!r})", "--gpus")
    return gpus
