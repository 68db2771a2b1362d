"""The profile's summary of a window (src/profiling.py), on recorded events."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from src import profiling

CUDA, CPU = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU


def _event(key: str, device_s: float, device=CUDA, annotation: bool = False, cpu_s: float = 0.0):
    return SimpleNamespace(
        key=key,
        count=1,
        device_type=device,
        self_device_time_total=device_s * 1e6,
        self_cpu_time_total=cpu_s * 1e6,
        is_user_annotation=annotation,
    )


def test_the_card_s_busy_time_counts_kernels_not_annotated_ranges():
    """The optimizer step's annotation spans its kernels and the gaps between them on the
    card's timeline: busy time and categories count the kernels alone."""
    events = [
        _event("nvjet_sm90_tst_256x128_gemm", 0.5),
        _event("kDequantizeBlockwise", 0.1),
        _event("kOptimizerStatic8bit2StateBlockwise", 0.02),
        _event("Optimizer.step#PagedAdamW8bit.step", 0.06, annotation=True),
        _event("aten::mm", 0.0, device=CPU, cpu_s=0.3),
    ]
    prof = SimpleNamespace(key_averages=lambda: events)
    summary = profiling.summarize(prof, wall=1.0)
    assert summary["gpu_busy_s"] == pytest.approx(0.62)
    assert summary["by_category_s"]["optimizer"] == pytest.approx(0.02)
    assert summary["gpu_idle_share"] == pytest.approx(0.38)
    assert [k["name"] for k in summary["top_kernels"]][-1] == "kOptimizerStatic8bit2StateBlockwise"
    assert summary["top_host_ops"][0]["name"] == "aten::mm"
