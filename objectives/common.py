"""Helpers shared by the objectives: plain functions, no torch."""

from __future__ import annotations

import lzma
import random
from pathlib import Path
from typing import Any


def open_text(path: Path):
    """Open a data file, reading `.xz` files transparently (shared/data stores large ones so)."""
    if path.suffix == ".xz":
        return lzma.open(path, "rt", encoding="utf-8", newline="")
    return path.open(encoding="utf-8", newline="")


def chat(user: str, system_prompt: str | None) -> list[dict[str, str]]:
    """The turns before the answer; a system turn only when the study sets one."""
    turns = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
    return [*turns, {"role": "user", "content": user}]


def split_train_val(rows: list[Any], train_n: int, val_n: int, seed: int) -> tuple[list, list]:
    """Seeded shuffle; the first `val_n` rows validate, up to `train_n` others train (0 = all)."""
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    val, rest = rows[:val_n], rows[val_n:]
    return (rest[:train_n] if train_n else rest), val


def subset(rows: list[Any], n: int, seed: int) -> list[Any]:
    """A seeded sample of `n` rows in their original order (0 = all rows)."""
    if not n or n >= len(rows):
        return list(rows)
    keep = sorted(random.Random(seed).sample(range(len(rows)), n))
    return [rows[i] for i in keep]


def generate_answers(model, tokenizer, examples: list[dict], settings: dict) -> list[str]:
    """src/generation.generate with the [eval] settings and what the trial adds to them: the
    fast path or `model.generate` (the benchmark's plain trial), the memory evaluation must
    stay within (the training peak), and a dict to fill with what generation did."""
    from src.generation import generate  # torch lives in the trial process only

    return generate(
        model,
        tokenizer,
        examples,
        settings["batch_size"],
        settings["max_new_tokens"],
        fast=settings.get("fast_generation"),  # None: the fast path where it pays (CUDA)
        limit_bytes=settings.get("memory_limit_bytes"),
        stats=settings.get("generation_stats"),
    )
