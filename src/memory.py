"""Peak memory of this trial process: CUDA caching-allocator and NVML on a GPU, RSS on the CPU."""

from __future__ import annotations

import os
import resource
import threading

import torch

GIB = 1024**3


class PeakMemory:
    """Start before loading the model; `read()` at the end.

    On CUDA, `torch.cuda.max_memory_reserved` is the figure optimised (what the allocator held);
    NVML's per-process figure is sampled in a thread because NVML keeps no peak of its own.
    """

    def __init__(self, interval_s: float = 0.1):
        self.cuda = torch.cuda.is_available()
        self.nvml_peak = 0
        self._stop = threading.Event()
        self._thread = None
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self._thread = threading.Thread(target=self._sample, args=(interval_s,), daemon=True)
            self._thread.start()

    def _sample(self, interval_s: float) -> None:
        try:
            import pynvml

            pynvml.nvmlInit()
            index = torch.cuda.current_device()
            uuid = torch.cuda.get_device_properties(index).uuid
            handle = pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
        except Exception:  # NVML missing or refused: the torch figure still stands
            return
        pid = os.getpid()
        while not self._stop.wait(interval_s):
            for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if proc.pid == pid and proc.usedGpuMemory:
                    self.nvml_peak = max(self.nvml_peak, proc.usedGpuMemory)

    def read(self) -> tuple[float, str, float | None]:
        """(peak GiB, what it measured, NVML peak GiB or None)."""
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=1)
        if self.cuda:
            nvml = self.nvml_peak / GIB if self.nvml_peak else None
            return torch.cuda.max_memory_reserved() / GIB, "cuda_reserved", nvml
        rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        return rss_kib * 1024 / GIB, "cpu_rss", None
