"""Progress events of a trial process (src/progress.py)."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

from src.progress import PREFIX, ProgressCallback, emit


def _events(capsys) -> list[dict]:
    lines = capsys.readouterr().out.splitlines()
    return [json.loads(line[len(PREFIX) :]) for line in lines if line.startswith(PREFIX)]


def test_events_carry_the_time(capsys):
    before = time.time()
    emit("start")
    (event,) = _events(capsys)
    assert event["event"] == "start" and before - 1 <= event["time"] <= time.time() + 1


def test_train_events_carry_the_gpu_peak_so_far_when_there_is_one(capsys):
    state = SimpleNamespace(global_step=3, num_input_tokens_seen=96)

    class Memory:
        def so_far(self):
            return 5.4321

    ProgressCallback(Memory()).on_log(None, state, None, logs={"loss": 1.5})
    ProgressCallback().on_log(None, state, None, logs={"loss": 1.5})  # CPU: no figure
    gpu, cpu = _events(capsys)
    assert gpu["gpu_gib"] == 5.432 and gpu["step"] == 3 and gpu["tokens"] == 96
    assert "gpu_gib" not in cpu


def test_a_step_s_losses_are_summed_and_recorded_at_its_end(capsys):
    """The trial path's micro-batch losses (`add_loss`) make one row and one train event at
    the step's end, in order, as the Trainer's log of that step would."""
    import torch

    progress = ProgressCallback()
    for step, losses in ((1, (0.25, 0.5)), (2, (1.0,))):
        state = SimpleNamespace(global_step=step, num_input_tokens_seen=10 * step)
        progress.on_step_begin(None, state, None)
        for loss in losses:
            progress.add_loss(torch.tensor(loss, dtype=torch.bfloat16))
        progress.on_step_end(None, state, None)
    progress.on_step_end(None, state, None)  # no loss added: nothing recorded
    assert [row[:3] for row in progress.curve["train"]] == [[1, 10, 0.75], [2, 20, 1.0]]
    events = _events(capsys)
    assert [(e["step"], e["loss"], e["tokens"]) for e in events] == [(1, 0.75, 10), (2, 1.0, 20)]
