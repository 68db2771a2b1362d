"""Progress lines from the trial process to the sweep: one JSON object per line on stdout."""

from __future__ import annotations

import json
import sys
import time

from transformers import TrainerCallback

from src.memory import cpu_peak_bytes

PREFIX = "SWEEP_PROGRESS "  # the sweep reads lines with this prefix; anything else is just logged


def emit(event: str, **fields) -> None:
    """One event, stamped with the wall-clock time (the sweep and benchmarks time phases by it)."""
    line = json.dumps({"event": event, "time": round(time.time(), 3), **fields})
    sys.stdout.write(PREFIX + line + "\n")
    sys.stdout.flush()


class ProgressCallback(TrainerCallback):
    """Streams step, train loss and validation loss; times the training steps alone. With
    `memory`, train events carry the GPU peak so far (`gpu_gib`): the sweep packs trials onto
    a card by what the running ones hold, not only by finished ones."""

    def __init__(self, memory=None):
        self.memory = memory
        self.train_seconds = 0.0
        self._t0 = 0.0
        # the learning curve, kept in the trial's result.json: [step, tokens, train loss,
        # the step's seconds] per step; [step, validation loss, validation accuracy or None]
        # per validation
        self.curve: dict[str, list] = {"train": [], "val": []}
        self._step_s = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        emit("train_begin")

    def on_train_end(self, args, state, control, **kwargs):
        emit("train_end")

    def on_step_begin(self, args, state, control, **kwargs):
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self._step_s = time.perf_counter() - self._t0
        self.train_seconds += self._step_s

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "eval_accuracy" in logs:  # TrialTrainer.evaluate logs it after the loss
            step, accuracy = state.global_step, logs["eval_accuracy"]
            if self.curve["val"] and self.curve["val"][-1][0] == step:
                self.curve["val"][-1][2] = accuracy
            emit("eval_accuracy", step=step, val_accuracy=accuracy)
        if logs and "loss" in logs:
            self.curve["train"].append(
                [
                    state.global_step,
                    int(state.num_input_tokens_seen),
                    float(logs["loss"]),
                    round(self._step_s, 4),
                ]
            )
            gpu = self.memory.so_far() if self.memory is not None else None
            if gpu is None and self.memory is not None and state.global_step % 10 == 1:
                # the CPU: the process's resident peak so far, for the live view only (the
                # sweep packs GPUs by gpu_gib); read every 10 steps, it is a /proc read
                emit("memory", cpu_gib=round(cpu_peak_bytes() / 2**30, 3))
            emit(
                "train",
                step=state.global_step,
                loss=logs["loss"],
                tokens=int(state.num_input_tokens_seen),
                **({"gpu_gib": round(gpu, 3)} if gpu is not None else {}),
            )

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if metrics and "eval_loss" in metrics:
            self.curve["val"].append([state.global_step, float(metrics["eval_loss"]), None])
            emit("eval", step=state.global_step, val_loss=metrics["eval_loss"])
