"""On the GPU machine: where a new batch length's CUDA-graph captures spend their host time
(issue 17: a 7B capture of every layer costs 0.65-0.77 s, a 0.5B one 0.31-0.36 s, for the same
kernels per layer; docs/bench/README.md, session 24).

    python3 tests/gpu/capture_profile.py MODEL_FOLDER [LENGTH ...]

The trial path's model (QLoRA r16, CUDA graphs, captured at first sight) takes one step at the
first length (lazy set-up, first captures), then for each further length one step that
captures, timed by parts, and one that replays it. Prints, per length: the capture step's and
the replay step's seconds, and the host seconds inside the parts `torch.cuda.graph` is made of
(the device sync and the emptied caches before each capture, `capture_begin`, the recording
itself, `capture_end`, which instantiates the graph) and the side-stream warm-up; then, for the
last length, torch.profiler's busiest host calls (CUDA runtime calls included) during its
capture step.
"""

from __future__ import annotations

import collections
import sys
import time
from pathlib import Path

import torch

from src import bench, cuda_graphs, train_qlora
from tests.src.test_speed import _train_cfg


class Parts:
    """Host seconds and calls per wrapped function (set up with `wrap`, undone by `undo`)."""

    def __init__(self):
        self.seconds = collections.Counter()
        self.calls = collections.Counter()
        self._undo = []

    def wrap(self, owner, name: str, label: str) -> None:
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[label] += time.perf_counter() - started
                self.calls[label] += 1

        setattr(owner, name, timed)
        self._undo.append((owner, name, original))

    def undo(self) -> None:
        for owner, name, original in reversed(self._undo):
            setattr(owner, name, original)
        self._undo.clear()


def step(model, length: int) -> float:
    batch = torch.randint(100, 30000, (1, length), generator=torch.Generator().manual_seed(length))
    stream = torch.cuda.current_stream()  # not `torch.cuda.synchronize`: that one is timed
    stream.synchronize()
    started = time.perf_counter()
    bench.loss_and_grads(model, batch.cuda())
    stream.synchronize()
    return time.perf_counter() - started


def main(folder: str, lengths: list[int]) -> None:
    cuda_graphs.PROBE_AT = 0  # captured at first sight: the capture is what is measured
    spec = bench.model_spec(folder)
    params = {"method": "qlora", "r": 16, "lora_alpha": 32, "dropout": 0.05}
    model, _ = train_qlora.setup(
        spec, params, _train_cfg(cuda_graphs=True), Path("/tmp/capture-profile")
    )
    shared = cuda_graphs.graph_set(model)
    print(
        f"{folder}: {shared.layers} graphed layers; first length {lengths[0]}: "
        f"{step(model, lengths[0]):.3f} s, again {step(model, lengths[0]):.3f} s"
    )
    graph_cls = torch.cuda.graphs.CUDAGraph
    for i, length in enumerate(lengths[1:]):
        last = i == len(lengths) - 2
        parts = Parts()
        parts.wrap(torch.cuda, "synchronize", "sync")
        parts.wrap(torch.cuda, "empty_cache", "empty_cache")
        if hasattr(torch._C, "_host_emptyCache"):
            parts.wrap(torch._C, "_host_emptyCache", "host_empty_cache")
        parts.wrap(graph_cls, "capture_begin", "capture_begin")
        parts.wrap(graph_cls, "capture_end", "capture_end (instantiate)")
        parts.wrap(cuda_graphs, "_warm_up", "warm-up (side stream)")
        parts.wrap(cuda_graphs, "_capture_forward", "forward capture (all parts)")
        parts.wrap(cuda_graphs, "Graphs", "forward + backward capture (all parts)")
        profiler = None
        if last:
            profiler = torch.profiler.profile(
                activities=[
                    torch.profiler.ProfilerActivity.CPU,
                    torch.profiler.ProfilerActivity.CUDA,
                ]
            )
            profiler.__enter__()
        before = shared.stats["capture_s"]
        captured = step(model, length)
        if profiler is not None:
            profiler.__exit__(None, None, None)
        parts.undo()
        replayed = step(model, length)
        print(
            f"\nlength {length}: capture step {captured:.3f} s, replay step {replayed:.3f} s, "
            f"capture_s {shared.stats['capture_s'] - before:.3f} s "
            f"({'with profiler' if last else 'timed by parts'})"
        )
        for label, seconds in parts.seconds.most_common():
            print(f"  {label:40s} {seconds:8.3f} s  {parts.calls[label]:5d} calls")
        if profiler is not None:
            table = profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
            print(table)
    print(
        "\ncosts per length (capture s, graphed step s):",
        {
            n: (round(c, 3) if c else c, round(s, 4) if s else s)
            for n, (c, s) in shared.shape_costs().items()
        },
    )


if __name__ == "__main__":
    main(sys.argv[1], [int(n) for n in sys.argv[2:]] or [1536, 1792, 2048, 2304])
