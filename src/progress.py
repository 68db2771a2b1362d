"""Progress lines from the trial process to the sweep: one JSON object per line on stdout."""

from __future__ import annotations

import json
import sys
import time

from transformers import TrainerCallback

PREFIX = "SWEEP_PROGRESS "  # the sweep reads lines with this prefix; anything else is just logged


def emit(event: str, **fields) -> None:
    sys.stdout.write(PREFIX + json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


class ProgressCallback(TrainerCallback):
    """Streams step, train loss and validation loss; times the training steps alone."""

    def __init__(self):
        self.train_seconds = 0.0
        self._t0 = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        emit("train_begin")

    def on_train_end(self, args, state, control, **kwargs):
        emit("train_end")

    def on_step_begin(self, args, state, control, **kwargs):
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.train_seconds += time.perf_counter() - self._t0

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            emit(
                "train",
                step=state.global_step,
                loss=logs["loss"],
                tokens=int(state.num_input_tokens_seen),
            )

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if metrics and "eval_loss" in metrics:
            emit("eval", step=state.global_step, val_loss=metrics["eval_loss"])
