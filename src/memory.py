"""Peak memory of this trial process: CUDA caching-allocator and NVML on a GPU, RSS on the CPU."""

from __future__ import annotations

import ctypes
import functools
import os
import resource
import threading

import torch

GIB = 1024**3


@functools.cache
def nvml_reader():
    """A function that returns the bytes NVML counts for this process on its current GPU
    (0 before it holds any), or None when NVML is missing or refuses."""
    try:
        import pynvml

        pynvml.nvmlInit()
        uuid = torch.cuda.get_device_properties(torch.cuda.current_device()).uuid
        handle = pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
    except Exception:
        return None
    pid = os.getpid()

    def read() -> int:
        procs = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
        return next((p.usedGpuMemory or 0 for p in procs if p.pid == pid), 0)

    return read


def held_bytes(reserved: int | None = None) -> int:
    """What this process holds on its GPU as the memory objective counts it (`PeakMemory.so_far`):
    the caching allocator's reservation (`reserved`, default now) plus what lies outside it
    now (`outside_bytes`; the reservation alone without NVML). Evaluation plans its batches
    against the training peak in this measure: on the H200 a 7B SQuAD trial's evaluation,
    planned in reservations alone, grew outside the allocator and ended 6 MiB above its
    training peak (session 26, docs/bench/README.md)."""
    return (torch.cuda.memory_reserved() if reserved is None else reserved) + outside_bytes()


def outside_bytes() -> int:
    """What this process holds on its GPU outside the caching allocator now: NVML's figure
    minus the reservation, both read now (CUDA context, loaded kernels, graphs' executables);
    0 without an NVML figure."""
    read = nvml_reader()
    used = read() if read else 0
    return max(0, used - torch.cuda.memory_reserved()) if used else 0


def cap(budget_gib: float) -> float | None:
    """On a GPU larger than the budget, let this process hold only the budget, as on a card
    of that size: the caching allocator gets the budget minus what the process holds outside
    it (CUDA context, measured through NVML once the context exists). A trial that would not
    fit on the budget card (24 GB by default) then runs out of memory here too, instead of
    looking fine on an H200. Returns the allocator's share of the card, None when uncapped.
    The CPU has no such cap: there the budget is checked against the measured peak after the
    trial (sweep/trial.py)."""
    if not budget_gib or not torch.cuda.is_available():
        return None
    torch.zeros(1, device="cuda")  # the context exists from here on
    outside = outside_bytes()
    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    fraction = (budget_gib * GIB - outside) / total
    if fraction >= 1:
        return None
    torch.cuda.set_per_process_memory_fraction(max(fraction, 0.0))
    return fraction


def cpu_peak_bytes() -> int:
    """This process's peak resident memory since start or since the last `_reset_cpu_peak`
    (Linux's VmHWM; elsewhere getrusage's lifetime peak)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _reset_cpu_peak() -> bool:
    """Start the peak resident memory anew (Linux >= 4.0: "5" to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# glibc serves a freed large block's size from its heap from then on (its mmap threshold
# follows the largest block freed, up to 32 MiB), and what a heap keeps depends on the order
# blocks were freed in: the same demo trial (24 steps, SmolLM2-135M, 2 cores) recorded peak
# RSS of 1.69-1.98 GiB in six fresh processes. With the threshold fixed at 1 MiB: 1.676 and
# 1.682 GiB (at 512 KiB 1.682, 1.689; at 128 KiB 1.54 three times, but training 70 % slower
# with every mid-sized block mapped anew), training as fast as before (docs/bench/README.md)
MMAP_THRESHOLD = 1 << 20
M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)


def fixed_mmap_threshold(threshold: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold (blocks at least `threshold` bytes are mapped and returned
    to the system when freed) so that a CPU trial's peak RSS, its memory objective, measures
    what it allocated rather than how the heap was left. A user's `MALLOC_MMAP_THRESHOLD_`
    stands. By hand: Python has no call for mallopt, so it goes through ctypes. Returns
    whether it was set (not glibc: False)."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):
        return False


class PeakMemory:
    """Start before loading the model; `phase()` when training ends (its peak is the trial's
    memory objective, what the configuration needs); `read()` at the end (the evaluation's).

    On CUDA the recorded peak is what the process held on the card, as NVML counts it: the
    caching allocator's peak reservation plus what lies outside it (CUDA context, cuBLAS
    workspaces), measured as NVML's current figure minus the current reservation, both read
    at the same moment (a sampled NVML figure from before training's memory was released,
    set against the reservation after it, counted the released memory twice: 10.24 GiB
    recorded for a 0.5B trial whose process NVML never saw above 5.92 GiB). NVML's own figure
    is also sampled in a thread (it keeps no peak), as a cross-check.
    """

    def __init__(self, interval_s: float = 0.1):
        self.cuda = torch.cuda.is_available()
        self.nvml_peak = 0
        self.nvml_now = 0
        self.allocated_gib = self.reserved_gib = None
        self.phase_peak: float | None = None  # the last `phase()`'s peak, GiB
        self._stop = threading.Event()
        self._thread = None
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self._thread = threading.Thread(target=self._sample, args=(interval_s,), daemon=True)
            self._thread.start()
        else:  # before the model is loaded: its blocks and the trial's follow the fixed rule
            fixed_mmap_threshold()

    def _sample(self, interval_s: float) -> None:
        read = nvml_reader()
        if read is None:  # NVML missing or refused: the torch figure still stands
            return
        while True:
            stopping = self._stop.is_set()  # one last sample after read() asks to stop
            if used := read():
                self.nvml_now = used
                self.nvml_peak = max(self.nvml_peak, used)
            if stopping:
                return
            self._stop.wait(interval_s)

    def restart(self) -> float:
        """Measure from now on, from what the process holds now (the trial's loaded base);
        returns that, GiB."""
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self.nvml_peak = self.nvml_now
            return self.so_far()
        _reset_cpu_peak()
        return cpu_peak_bytes() / GIB

    def so_far(self) -> float | None:
        """The GPU peak up to now, as `read()` computes it (None on the CPU); the sweep packs
        trials by it while they run."""
        if not self.cuda:
            return None
        return held_bytes(torch.cuda.max_memory_reserved()) / GIB

    def phase(self) -> float:
        """The peak of the phase that ends now (GiB, as `read()` computes it); measuring starts
        anew from what the process holds now. Free what the phase no longer needs before
        calling it."""
        if self.cuda:
            peak = self.so_far()
            torch.cuda.reset_peak_memory_stats()
        else:
            peak = cpu_peak_bytes() / GIB
            _reset_cpu_peak()
        self.phase_peak = peak
        return peak

    def read(self) -> tuple[float, str, float | None]:
        """(peak GiB since the start or the last `phase()`, what it measured, NVML peak GiB of
        the whole process or None)."""
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=2)  # its last sample is taken now
        if self.cuda:
            self.allocated_gib = torch.cuda.max_memory_allocated() / GIB
            self.reserved_gib = torch.cuda.max_memory_reserved() / GIB
            kind = "cuda_process" if self.nvml_now else "cuda_reserved"
            return self.so_far(), kind, (self.nvml_peak / GIB if self.nvml_now else None)
        return cpu_peak_bytes() / GIB, "cpu_rss", None
