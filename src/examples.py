"""Example generations for the report: the same prompts answered by the base model and by the
best trials' adapters (or fully fine-tuned models), greedy.

    python -m src.examples request.json answers.json

Runs in its own process like a trial (the sweep never imports torch). request.json:
{"trials": [{"number", "dir"}], "n": 3, "max_new_tokens": 48}; every trial folder holds the
spec.json it was trained from, so model, task, data and prompt format are the trial's own.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from objectives import evaluation_rows
from src import models, speed
from src.generation import generate


def answers(trial_dir: Path, rows: list[dict], max_new_tokens: int, base: bool) -> dict:
    """{"trial": ..., "base": ...}: the trained model's answers, and its base model's."""
    spec = json.loads((trial_dir / "spec.json").read_text())
    method = spec["params"].get("method", "qlora")
    # On the CPU, bitsandbytes dequantizes every 4-bit weight for every generated token
    # (minutes for a few answers); the examples there use the unquantized base + the adapter.
    load_as = method if torch.cuda.is_available() else "lora"
    model, tokenizer = models.load_trained(trial_dir, spec, load_as)
    out = {"trial": generate(model, tokenizer, rows, 8, max_new_tokens)}
    if not base:
        return out
    if method == "full":  # no adapter to switch off: load the 16-bit base itself
        dtype, cache = spec["train"]["compute_dtype"], Path(spec["cache_dir"])
        base_model, tokenizer, _ = models.load_base(spec["model"], dtype, cache, "lora")
        out["base"] = generate(base_model, tokenizer, rows, 8, max_new_tokens)
    else:
        with model.disable_adapter():
            out["base"] = generate(model, tokenizer, rows, 8, max_new_tokens)
    return out


def main(request_path: Path, out_path: Path) -> None:
    request = json.loads(request_path.read_text())
    trials = request["trials"]
    first = json.loads((Path(trials[0]["dir"]) / "spec.json").read_text())
    speed.attention_backends(first["train"].get("cudnn_attention", False))  # as in the trials
    rows = evaluation_rows(first, request["n"])[: request["n"]]
    table = {"prompts": [r["messages"][-1]["content"] for r in rows], "reference": [], "base": {}}
    table["reference"] = [_reference(r) for r in rows]
    table["answers"] = {}
    for trial in trials:
        spec = json.loads((Path(trial["dir"]) / "spec.json").read_text())
        alias = spec["params"]["model"]
        need_base = alias not in table["base"]
        got = answers(Path(trial["dir"]), rows, request["max_new_tokens"], need_base)
        table["answers"][str(trial["number"])] = got["trial"]
        if "base" in got:
            table["base"][alias] = got["base"]
    out_path.write_text(json.dumps(table, indent=1))


def _reference(row: dict) -> str:
    for key in ("answer", "answers", "reference", "output"):
        if key in row:
            value = row[key]
            return value[0] if isinstance(value, list) else str(value)
    return ""


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
