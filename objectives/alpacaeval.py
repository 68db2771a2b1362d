"""alpacaeval: validates in sweep.toml; training and evaluation arrive with the next issue."""

from __future__ import annotations

METRIC = "win_rate"
DIRECTION = "maximize"
IMPLEMENTED = False
LOCAL_FILES = ("alpacaeval/alpaca_eval.jsonl", "alpaca/alpaca_data_5000.json.xz")


def load(*args, **kwargs):
    raise NotImplementedError("the alpacaeval objective is not implemented yet")


def evaluate(*args, **kwargs):
    raise NotImplementedError("the alpacaeval objective is not implemented yet")
