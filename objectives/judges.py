"""Pairwise judges for AlpacaEval: who wrote the better answer, the reference or the model?

A judge takes records {instruction, output_1 (reference), output_2 (model)} and returns one
preference per record in [1, 2] (1 + P(output_2 is better)), or None where it could not judge.

- "openai": any OpenAI-compatible chat API, AlpacaEval 2's `weighted_alpaca_eval_gpt4_turbo`
  protocol: its prompt (read from the installed alpaca_eval package), the two outputs in a
  seeded random order as "m" and "M", one token with top log-probabilities, and the
  preference from P(m) / (P(m) + P(M)). The key comes from the environment variable named by
  `api_key_env` and is passed to the client only: never logged or stored.
- "local": a Hugging Face causal LM (`local_judge`, in the trial process): the same prompt
  through the model's chat template, next-token log-probabilities of "m" and "M"
  (src/scoring.py), both orders averaged to cancel position bias.
- "package.module:function": your own; called as function(records, **kwargs).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import math
import os
import random
import re
from collections.abc import Callable
from pathlib import Path

TEMPLATE = "alpaca_eval/evaluators_configs/alpaca_eval_clf_gpt4_turbo/alpaca_eval_clf.txt"
LABELS = ("m", "M")  # the template's identifiers of the first and second output
REFERENCE = "gpt4_1106_preview"  # AlpacaEval 2's baseline


class JudgeUnavailable(Exception):
    """The judge cannot be reached or run; the objective then falls back and says why."""


def judge_messages(instruction: str, first: str, second: str) -> list[dict[str, str]]:
    """AlpacaEval's classification prompt, split into chat turns (it is written in ChatML)."""
    # read the file without importing alpaca_eval (its import needs pkg_resources and more)
    text = importlib.metadata.distribution("alpaca-eval").locate_file(TEMPLATE).read_text()
    # str.format would trip over the template's literal braces: fill the three fields in one
    # pass, so braces inside an answer are left alone
    fields = {"instruction": instruction, "output_1": first, "output_2": second}
    text = re.sub(r"\{(instruction|output_1|output_2)\}", lambda m: fields[m.group(1)], text)
    turns = re.findall(r"<\|im_start\|>(\w+)\n(.*?)\n?<\|im_end\|>", text, flags=re.S)
    return [{"role": role, "content": content.strip()} for role, content in turns]


def prompt_problem() -> str | None:
    """Why AlpacaEval's judge prompt cannot be read (None when it can): the openai and local
    judges need it, after a trial's training and generation."""
    try:
        path = importlib.metadata.distribution("alpaca-eval").locate_file(TEMPLATE)
    except importlib.metadata.PackageNotFoundError:
        return "the alpaca-eval package is not installed (pip install alpaca-eval==0.6.6)"
    if not Path(str(path)).is_file():
        return f"alpaca-eval has no judge prompt {TEMPLATE}"
    return None


def swapped_orders(n: int, seed: int) -> list[bool]:
    """Per record, whether the model's output is shown first (AlpacaEval randomises it)."""
    rng = random.Random(seed)
    return [rng.random() < 0.5 for _ in range(n)]


def preference_from_logprobs(logprob_m: float, logprob_big_m: float, swapped: bool) -> float:
    """1 + P(the model's output wins), from the log-probabilities of the labels "m" and "M"."""
    top = max(logprob_m, logprob_big_m)
    p_first = math.exp(logprob_m - top) / (
        math.exp(logprob_m - top) + math.exp(logprob_big_m - top)
    )
    return 1 + (p_first if swapped else 1 - p_first)


def openai_judge(
    records: list[dict],
    model: str,
    base_url: str | None = None,
    api_key_env: str = "OPENAI_API_KEY",
    seed: int = 0,
) -> list[float | None]:
    """The weighted GPT-4-turbo protocol against any OpenAI-compatible endpoint."""
    try:
        import openai
    except ImportError as err:  # pragma: no cover - a dependency of alpaca-eval
        raise JudgeUnavailable(f"the openai package is missing ({err})") from None
    key = os.environ.get(api_key_env)
    if not key:
        raise JudgeUnavailable(f"environment variable {api_key_env} is not set")
    client = openai.OpenAI(api_key=key, base_url=base_url, max_retries=2, timeout=60)
    out: list[float | None] = []
    for record, swapped in zip(records, swapped_orders(len(records), seed), strict=True):
        first, second = record["output_1"], record["output_2"]
        if swapped:
            first, second = second, first
        try:
            reply = client.chat.completions.create(
                model=model,
                messages=judge_messages(record["instruction"], first, second),
                max_tokens=1,
                temperature=1,
                logprobs=True,
                top_logprobs=5,
            )
        except openai.APIError as e:  # unreachable, refused, unknown model, out of quota
            raise JudgeUnavailable(f"{type(e).__name__}: {e}") from None
        top = {t.token: t.logprob for t in reply.choices[0].logprobs.content[0].top_logprobs}
        if not set(LABELS) & set(top):
            out.append(None)  # as AlpacaEval: no label among the top tokens, no preference
            continue
        out.append(
            preference_from_logprobs(top.get("m", -math.inf), top.get("M", -math.inf), swapped)
        )
    return out


def plugged_in(name: str) -> Callable:
    """`package.module:function` imported by name."""
    module, _, attr = name.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise JudgeUnavailable(f"cannot import judge {name!r}: {err}") from None


def annotate(records: list[dict], preferences: list[float | None], annotator: str) -> list[dict]:
    """Records in AlpacaEval's annotation format."""
    return [
        {**r, "annotator": annotator, "preference": p}
        for r, p in zip(records, preferences, strict=True)
    ]


def local_judge(model, tokenizer, records: list[dict], batch_size: int) -> list[float]:
    """Pairwise preference from label log-probabilities, both orders averaged."""
    from src.scoring import choice_logprobs  # torch lives in the trial process only

    prompts = []
    for r in records:
        for first, second in ((r["output_1"], r["output_2"]), (r["output_2"], r["output_1"])):
            messages = judge_messages(r["instruction"], first, second)
            prompts.append({"messages": messages, "choices": list(LABELS)})
    scores = choice_logprobs(model, tokenizer, prompts, batch_size)
    out = []
    for k in range(len(records)):
        reference_first = preference_from_logprobs(*scores[2 * k], swapped=False)
        model_first = preference_from_logprobs(*scores[2 * k + 1], swapped=True)
        out.append((reference_first + model_first) / 2)
    return out
