"""On the GPU machine: bitsandbytes' optimizer step without its per-parameter waits
(src/speed.without_parameter_waits) and with one update per group (src/speed.grouped_updates)
updates exactly as the library's own step.

pytest -m gpu tests/gpu/test_optimizer.py   (no model needed)
"""

from __future__ import annotations

import pytest
import torch

from src import speed
from tests.src.test_speed import counted_updates

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("name", ["PagedAdamW8bit", "PagedAdamW32bit", "AdamW8bit"])
def test_updates_are_the_library_s_to_the_bit_without_waiting(name, monkeypatch):
    """LoRA-like tensors of a 7B layer (some above the size bitsandbytes pages): five steps
    whose gradients come from a matmul queued just before, as a backward's would: the same
    parameters with and without the waits, and after the first step (which makes the states)
    no device sync at all instead of one per parameter (and one more where paged)."""
    import bitsandbytes.optim as bnb_optim

    shapes = [(16, 3584), (512, 16), (18944, 16), (16, 18944), (3584, 16)]

    def run(unwaited: bool) -> tuple[list[torch.Tensor], int]:
        gen = torch.Generator(device="cuda").manual_seed(0)
        params = [
            torch.nn.Parameter(torch.randn(s, device="cuda", generator=gen) * 0.01) for s in shapes
        ]
        optimizer = getattr(bnb_optim, name)(params, lr=1e-3)
        if unwaited:
            assert speed.without_parameter_waits(optimizer)
        syncs = []
        real = torch.cuda.synchronize
        monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: (syncs.append(1), real(*a)))
        x = torch.randn(4096, 4096, device="cuda", generator=gen)
        for step in range(5):
            for p in params:
                busy = x @ x  # the card is busy when the gradient is written
                p.grad = torch.randn(p.shape, device="cuda", generator=gen) + busy[0, 0] * 0
            optimizer.step()
            if step == 0:  # the first step makes the states (paged ones sync as they fill)
                syncs.clear()
        monkeypatch.undo()
        torch.cuda.synchronize()
        return [p.detach().clone() for p in params], len(syncs)

    (waited, waits), (unwaited, fewer) = run(False), run(True)
    assert waits >= 4 * len(shapes) and fewer == 0
    assert all(torch.equal(a, b) for a, b in zip(waited, unwaited, strict=True))


@pytest.mark.parametrize("name", ["PagedAdamW8bit", "PagedAdamW32bit", "AdamW8bit"])
def test_grouped_updates_are_the_library_s_to_the_bit(name, monkeypatch):
    """The same 7B LoRA-like tensors as one group (`speed.grouped_updates`, one flat tensor of
    2.6 M elements, paged where the library pages, unlike most of the tensors alone), stepped
    five times without waits: the parameters of the library's own step to the bit, with one
    update call a step instead of one per tensor."""
    import bitsandbytes.optim as bnb_optim

    shapes = [(16, 3584), (512, 16), (18944, 16), (16, 18944), (3584, 16)] * 4

    def run(grouped: bool) -> tuple[list[torch.Tensor], int]:
        gen = torch.Generator(device="cuda").manual_seed(0)
        params = [
            torch.nn.Parameter(torch.randn(s, device="cuda", generator=gen) * 0.01) for s in shapes
        ]
        optimizer = getattr(bnb_optim, name)(params, lr=1e-3, weight_decay=0.01)
        assert speed.without_parameter_waits(optimizer)
        if grouped:
            assert speed.grouped_updates(optimizer) == len(shapes)
        calls = counted_updates(monkeypatch)
        for _ in range(5):
            for p in params:
                p.grad = torch.randn(p.shape, device="cuda", generator=gen)
            optimizer.step()
        monkeypatch.undo()
        torch.cuda.synchronize()
        return [p.detach().clone() for p in params], len(calls)

    (alone, per_tensor), (grouped, fewer) = run(False), run(True)
    assert per_tensor == 5 * len(shapes) and fewer == 5
    assert all(torch.equal(a, b) for a, b in zip(alone, grouped, strict=True))
