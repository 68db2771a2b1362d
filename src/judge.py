"""Runs the configured AlpacaEval judge inside the trial process (objectives/judges.py).

The local judge scores AlpacaEval's prompt with a Hugging Face model: the log-probabilities of
the labels "m" and "M" as the next token (src/scoring.py), in both orders, averaged.
"""

from __future__ import annotations

from pathlib import Path

from objectives import judges
from src.scoring import choice_logprobs


def run_judge(judge: dict, records: list[dict], model, tokenizer, settings: dict) -> list:
    name = judge["name"]
    kwargs = {k: v for k, v in judge.items() if k != "name"}
    if name == "openai":
        return judges.openai_judge(records, **kwargs)
    if name == "local":
        if settings.get("judge_model"):  # another model than the one trained
            from src import models

            other, other_tok, _ = models.load_base(
                settings["judge_model"], "auto", Path(settings["cache_dir"])
            )
            return local_judge(other, other_tok, records, settings["batch_size"])
        with model.disable_adapter():  # the trial's base model, adapter switched off
            return local_judge(model, tokenizer, records, settings["batch_size"])
    return judges.plugged_in(name)(records, **kwargs)


def local_judge(model, tokenizer, records: list[dict], batch_size: int) -> list[float]:
    """Pairwise preference from label log-probabilities, both orders averaged."""
    prompts = []
    for r in records:
        for first, second in ((r["output_1"], r["output_2"]), (r["output_2"], r["output_1"])):
            messages = judges.judge_messages(r["instruction"], first, second)
            prompts.append({"messages": messages, "choices": list(judges.LABELS)})
    scores = choice_logprobs(model, tokenizer, prompts, batch_size)
    out = []
    for k in range(len(records)):
        reference_first = judges.preference_from_logprobs(*scores[2 * k], swapped=False)
        model_first = judges.preference_from_logprobs(*scores[2 * k + 1], swapped=True)
        out.append((reference_first + model_first) / 2)
    return out
