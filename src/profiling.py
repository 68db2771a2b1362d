"""Where a training step's time goes: torch.profiler over a window, summed by kernel category.

`Window` profiles whatever runs inside it (the bench's one forward+backward); `Steps`, a
Trainer callback, profiles optimizer steps [first, first + count) of a real trial (the
whole-trial benchmark's `--profile`). Both give the same summary: GPU busy time by kernel
category against the wall time (the rest is the GPU waiting for the host), the busiest
kernels, and the host's busiest operators.
"""

from __future__ import annotations

import collections
import time
import warnings

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import TrainerCallback

CATEGORIES = (  # GPU kernels by name, for "what limits it"
    ("dequantization", ("dequant",)),
    ("attention", ("flash", "fmha", "attention", "efficient")),
    ("matmul", ("gemm", "cutlass", "xmma", "nvjet", "wgmma", "sm90", "sm100", "cublas")),
    ("fused kernels (Liger)", ("liger", "rms_norm", "swiglu", "rope", "cross_entropy")),
    ("optimizer", ("optimizer", "adam")),
)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Window:
    """`with Window() as w: ...` then `w.summary` (the GPU's work inside it waited for)."""

    def __enter__(self):
        _sync()
        activities = [ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(ProfilerActivity.CUDA)
        self._prof = profile(activities=activities)
        self._prof.__enter__()
        self._started = time.perf_counter()
        return self

    def __exit__(self, *exc):
        _sync()
        wall = time.perf_counter() - self._started
        self._prof.__exit__(*exc)
        self.summary = summarize(self._prof, wall)
        return False


def summarize(prof, wall: float) -> dict:
    events = prof.key_averages()
    kernels = [  # a user annotation's range on the card (the optimizer step's) is no kernel:
        e  # counted as one, it made the 7B step's kernels look 8 % busier (session 22)
        for e in events
        if e.self_device_time_total > 0
        and e.device_type == torch.autograd.DeviceType.CUDA
        and not getattr(e, "is_user_annotation", False)
    ]
    by_category = {name: 0.0 for name, _ in CATEGORIES} | {"other kernels": 0.0}
    for event in kernels:
        name = event.key.lower()
        category = next(
            (c for c, words in CATEGORIES if any(w in name for w in words)), "other kernels"
        )
        by_category[category] += event.self_device_time_total / 1e6
    busy = sum(by_category.values())
    top = sorted(kernels, key=lambda e: -e.self_device_time_total)[:12]
    host = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU]
    top_host = sorted(host, key=lambda e: -e.self_cpu_time_total)[:12]
    return {
        "wall_s": wall,  # profiled, so somewhat slower than unprofiled
        "gpu_busy_s": busy,
        "gpu_idle_share": max(0.0, 1 - busy / wall) if wall else None,
        "by_category_s": by_category,
        "kernel_launches": sum(e.count for e in kernels),
        "top_kernels": [
            {"name": e.key[:90], "s": e.self_device_time_total / 1e6, "count": e.count} for e in top
        ],
        "top_host_ops": [
            {"name": e.key[:90], "s": e.self_cpu_time_total / 1e6, "count": e.count}
            for e in top_host
        ],
    }


class Steps(TrainerCallback):
    """Profile optimizer steps [first, first + count) of a Trainer run, then list where the
    step after them made the host wait for the GPU (torch's sync debug mode, from the end of
    the last profiled step, so the next batch's fetch and copies count: each synchronizing
    call's Python file and line, CUDA only); `summary` after (None where training ended
    before the window closed)."""

    def __init__(self, first: int, count: int):
        self.first, self.last = first, first + count
        self.summary: dict | None = None
        self._window: Window | None = None
        self._caught = None

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.first and self._window is None:
            self._window = Window().__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        if self._window is not None and state.global_step >= self.last:
            self._window.__exit__(None, None, None)
            self.summary = self._window.summary | {"steps": [self.first, self.last]}
            self._window = None
            if torch.cuda.is_available():
                self._caught = warnings.catch_warnings(record=True)
                self._records = self._caught.__enter__()
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
        elif self._caught is not None:
            torch.cuda.set_sync_debug_mode(0)
            self._caught.__exit__(None, None, None)
            self._caught = None
            sites = collections.Counter(
                f"{w.filename.rsplit('site-packages/', 1)[-1]}:{w.lineno}"
                for w in self._records
                if "synchroniz" in str(w.message)
            )
            self.summary["sync_sites"] = dict(sites.most_common(12))
