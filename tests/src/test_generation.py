"""Batched greedy generation and the local judge on a tiny random Qwen2."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from objectives.common import chat
from src.generation import generate
from src.judge import local_judge


@pytest.fixture(scope="module")
def tiny(tiny_model):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_model), AutoTokenizer.from_pretrained(
        tiny_model
    )


def test_batched_generation_equals_one_at_a_time(tiny):
    model, tokenizer = tiny
    questions = ["Hi", "What is the capital of France, and why is it Paris?", "2+2?", "Tell me"]
    examples = [{"messages": chat(q, "")} for q in questions]
    batched = generate(model, tokenizer, examples, batch_size=4, max_new_tokens=6)
    single = [generate(model, tokenizer, [e], 1, 6)[0] for e in examples]
    assert batched == single and all(batched)


def test_local_judge_is_order_symmetric(tiny):
    """Both orders are averaged, so swapping the two outputs mirrors the preference."""
    model, tokenizer = tiny
    records = [
        {"instruction": "Name a colour.", "output_1": "Blue.", "output_2": "Red, like a rose."},
        {"instruction": "Say hi.", "output_1": "Hello there!", "output_2": "hi"},
    ]
    mirrored = [{**r, "output_1": r["output_2"], "output_2": r["output_1"]} for r in records]
    prefs = local_judge(model, tokenizer, records, batch_size=4)
    back = local_judge(model, tokenizer, mirrored, batch_size=4)
    assert all(1 <= p <= 2 for p in prefs)
    assert [3 - p for p in back] == pytest.approx(prefs, abs=1e-5)
