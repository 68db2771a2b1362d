"""Peak memory of this trial process: CUDA caching-allocator and NVML on a GPU, RSS on the CPU."""

from __future__ import annotations

import os
import resource
import threading

import torch

GIB = 1024**3


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
    read = nvml_reader()
    outside = max(0, read() - torch.cuda.memory_reserved()) if read else 0
    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    fraction = (budget_gib * GIB - outside) / total
    if fraction >= 1:
        return None
    torch.cuda.set_per_process_memory_fraction(max(fraction, 0.0))
    return fraction


class PeakMemory:
    """Start before loading the model; `read()` at the end.

    On CUDA the recorded peak is what the process held on the card, as NVML counts it: the
    caching allocator's peak reservation plus what lies outside it (CUDA context, cuBLAS
    workspaces), measured as NVML's current figure minus the current reservation. NVML's own
    figure is also sampled in a thread (it keeps no peak), as a cross-check.
    """

    def __init__(self, interval_s: float = 0.1):
        self.cuda = torch.cuda.is_available()
        self.nvml_peak = 0
        self.nvml_now = 0
        self.allocated_gib = self.reserved_gib = None
        self._stop = threading.Event()
        self._thread = None
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self._thread = threading.Thread(target=self._sample, args=(interval_s,), daemon=True)
            self._thread.start()

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

    def so_far(self) -> float | None:
        """The GPU peak up to now, as `read()` computes it (None on the CPU); the sweep packs
        trials by it while they run."""
        if not self.cuda:
            return None
        reserved = torch.cuda.max_memory_reserved() / GIB
        if not self.nvml_now:  # no NVML: the allocator's figure alone
            return reserved
        return reserved + max(0, self.nvml_now - torch.cuda.memory_reserved()) / GIB

    def read(self) -> tuple[float, str, float | None]:
        """(peak GiB, what it measured, NVML peak GiB or None)."""
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=2)  # its last sample is taken now
        if self.cuda:
            self.allocated_gib = torch.cuda.max_memory_allocated() / GIB
            self.reserved_gib = torch.cuda.max_memory_reserved() / GIB
            kind = "cuda_process" if self.nvml_now else "cuda_reserved"
            return self.so_far(), kind, (self.nvml_peak / GIB if self.nvml_now else None)
        rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        return rss_kib * 1024 / GIB, "cpu_rss", None
