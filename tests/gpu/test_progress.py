"""On the GPU machine: a trial's step losses read from the card without waiting for it
(src/progress.ProgressCallback).

pytest -m gpu tests/gpu/test_progress.py   (no model needed)
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from src.progress import ProgressCallback

pytestmark = pytest.mark.gpu


def test_step_losses_arrive_from_the_card_in_order_and_the_host_does_not_wait():
    """Each step's loss comes from behind ~0.5 s of queued matmuls: the steps' ends return
    before the card is done (nothing recorded yet), and validation's flush gives every
    step's summed loss, in order, equal to the values on the card."""
    x = torch.randn(8192, 8192, device="cuda")
    progress, want = ProgressCallback(), []
    progress.on_train_begin(None, None, None)  # as a trial: the pinned slots, ahead
    for step in range(4):  # step 0: one-off set-ups (cuBLAS, the allocator's blocks, events)
        state = SimpleNamespace(global_step=step, num_input_tokens_seen=step)
        progress.on_step_begin(None, state, None)
        for _ in range(10):
            x = torch.tanh(x @ x)
        parts = [x[0, 0].float() + step, x[1, 1].float()]
        for part in parts:
            progress.add_loss(part)
        want.append(parts[0] + parts[1])
        progress.on_step_end(None, state, None)
        if step == 0:  # on the H200 step 1 waited when step 0 had not run the same work (by my
            progress.flush(wait=True)  # reading: the allocator taking its 256 MiB blocks)
            progress.curve["train"].clear()
            want.clear()
            torch.cuda.synchronize()
    assert progress.curve["train"] == [], "the host waited for the card"
    progress.flush(wait=True)
    rows = progress.curve["train"]
    assert [row[0] for row in rows] == [1, 2, 3]
    assert [row[2] for row in rows] == [float(w) for w in want]
