"""Progress lines from the trial process to the sweep: one JSON object per line on stdout."""

from __future__ import annotations

import collections
import json
import sys
import time

import torch
from transformers import TrainerCallback

from src.memory import cpu_peak_bytes

SLOTS = 64  # step losses on their way from the card at most (the host runs ~1 step ahead)
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
        # the trial path's step losses (`add_loss`, TrialTrainer): read from the GPU once they
        # are there instead of by the Trainer's logging, whose `.item()` after every step made
        # the host wait for the card and the card then idle while the host logged, collated
        # and launched the next step's first kernels. [step, tokens, loss, step s, event]
        self._loss = None
        self._pending: collections.deque = collections.deque()
        self._host: torch.Tensor | None = None  # pinned slots the losses are copied into
        self._slot = 0

    def on_train_begin(self, args, state, control, **kwargs):
        if torch.cuda.is_available():  # before the steps: see `_slots`
            self._slots()
        emit("train_begin")

    def on_train_end(self, args, state, control, **kwargs):
        self.flush(wait=True)
        emit("train_end")

    def on_step_begin(self, args, state, control, **kwargs):
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self._step_s = time.perf_counter() - self._t0
        self.train_seconds += self._step_s
        if self._loss is not None:
            loss, self._loss = self._loss, None
            done = None
            if loss.is_cuda:  # copied when the card gets there; the host goes on
                if len(self._pending) == SLOTS:  # every slot still awaited: take them
                    self.flush(wait=True)
                host = self._slots()[self._slot % SLOTS]
                self._slot += 1
                host.copy_(loss, non_blocking=True)
                loss, done = host, torch.cuda.Event()
                done.record()
            tokens = int(state.num_input_tokens_seen)
            self._pending.append((state.global_step, tokens, loss, self._step_s, done))
            self.flush(wait=False)

    def _slots(self) -> torch.Tensor:
        """The pinned slots, allocated once: pinned memory's first allocation waits for the
        card (measured on the H200), later copies into it do not."""
        if self._host is None:
            self._host = torch.empty(SLOTS, dtype=torch.float32, pin_memory=True)
        return self._host

    def add_loss(self, loss: torch.Tensor) -> None:
        """A micro-batch's loss (as the Trainer's `training_step` returns it); a step's are
        summed in float32, as the Trainer sums them for its log."""
        loss = loss.detach().float()
        self._loss = loss if self._loss is None else self._loss + loss

    def flush(self, wait: bool) -> None:
        """Record the step losses that have arrived (`wait`: all of them, in order)."""
        while self._pending:
            step, tokens, loss, step_s, done = self._pending[0]
            if done is not None and not wait and not done.query():
                return
            self._pending.popleft()
            if done is not None:
                done.synchronize()
            self.record(step, tokens, float(loss), step_s)

    def record(self, step: int, tokens: int, loss: float, step_s: float) -> None:
        """A training step's loss: into the curve, and out to the sweep (the live view)."""
        self.curve["train"].append([step, tokens, loss, round(step_s, 4)])
        gpu = self.memory.so_far() if self.memory is not None else None
        if gpu is None and self.memory is not None and step % 10 == 1:
            # the CPU: the process's resident peak so far, for the live view only (the sweep
            # packs GPUs by gpu_gib); read every 10 steps, it is a /proc read
            emit("memory", cpu_gib=round(cpu_peak_bytes() / 2**30, 3))
        emit(
            "train",
            step=step,
            loss=loss,
            tokens=tokens,
            **({"gpu_gib": round(gpu, 3)} if gpu is not None else {}),
        )

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "eval_accuracy" in logs:  # TrialTrainer.evaluate logs it after the loss
            step, accuracy = state.global_step, logs["eval_accuracy"]
            if self.curve["val"] and self.curve["val"][-1][0] == step:
                self.curve["val"][-1][2] = accuracy
            emit("eval_accuracy", step=step, val_accuracy=accuracy)
        if logs and "loss" in logs:  # the plain recipe: the Trainer logs every step
            tokens = int(state.num_input_tokens_seen)
            self.record(state.global_step, tokens, float(logs["loss"]), self._step_s)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if metrics and "eval_loss" in metrics:
            self.curve["val"].append([state.global_step, float(metrics["eval_loss"]), None])
            emit("eval", step=state.global_step, val_loss=metrics["eval_loss"])
