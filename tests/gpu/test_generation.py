"""On the GPU machine: the fast generation path (static cache, decode step as a CUDA graph,
LoRA merged into dense weights) against `model.generate` on a random-weight Qwen2.5 shape with
a trial's model (4-bit base, LoRA with non-zero B, Liger kernels, fused LoRA layers).

SWEEP_GPU_MODEL=/tmp/qwen2.5-0.5b-random pytest -m gpu tests/gpu/test_generation.py
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch

from objectives.common import chat
from src import speed, train_qlora
from src.data import prompt_ids
from src.generation import Runner, generate, inference_weights
from sweep.config import Model, Train

pytestmark = pytest.mark.gpu
STEPS = 8


@pytest.fixture(scope="module")
def trial_model(tmp_path_factory):
    folder = os.environ["SWEEP_GPU_MODEL"]
    spec = dataclasses.asdict(Model(alias="gpu", path=Path(folder)))
    spec["path"] = folder
    params = {"method": "qlora", "r": 16, "lora_alpha": 32, "dropout": 0.05}
    train = dataclasses.asdict(Train())
    model, tokenizer = train_qlora.setup(spec, params, train, tmp_path_factory.mktemp("cache"))
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # as after training: the adapter changes the answers
            param.data.normal_(0, 0.02)
    speed.decompile_layers(model)
    model.eval()
    return model, tokenizer


def _prompts(tokenizer) -> list[list[int]]:
    words = "the quick brown fox jumps over the lazy dog while it rains in spain".split()
    texts = [" ".join(words[: 3 + (i * 7) % 13]) + f" question {i}?" for i in range(16)]
    return [prompt_ids(tokenizer, chat(t, None)) for t in texts]


@pytest.mark.parametrize("dense", [False, True])
def test_first_decode_steps_match_generate(trial_model, dense):
    """The first 8 decode steps pick generate's tokens, their logits within 2 % relative."""
    model, tokenizer = trial_model
    prompts = _prompts(tokenizer)
    pad = tokenizer.pad_token_id
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :], mask[row, width - len(p) :] = torch.tensor(p), 1
    with torch.no_grad():
        plain = model.generate(
            input_ids=ids.cuda(),
            attention_mask=mask.cuda(),
            max_new_tokens=STEPS,
            min_new_tokens=STEPS,
            do_sample=False,
            pad_token_id=pad,
            output_logits=True,
            return_dict_in_generate=True,
        )
    want_tokens = plain.sequences[:, width:]
    want_logits = torch.stack(plain.logits, dim=1).float()
    limit = 10**12 if dense else None
    with torch.no_grad(), inference_weights(model, limit) as merged:
        runner = Runner(model, len(prompts), STEPS, pad, eos=[-1], keep_logits=True)
        got = runner.generate(prompts)
        got_logits = runner.step.logits.clone()
    assert merged == dense and runner.graphed
    assert torch.equal(torch.tensor(got, device="cuda"), want_tokens)
    for step in range(STEPS):
        a, b = got_logits[:, step], want_logits[:, step]
        assert ((a - b).norm() / b.norm()).item() < 0.02, step


def test_answers_match_generate(trial_model):
    """Whole answers, batched and sorted, as an evaluation asks for them."""
    model, tokenizer = trial_model
    examples = [{"messages": chat(f"Say something about {i} apples.", None)} for i in range(24)]
    stats = {}
    fast = generate(model, tokenizer, examples, 16, 24, limit_bytes=10**12, stats=stats)
    plain = generate(model, tokenizer, examples, 16, 24, fast=False)
    same = sum(a == b for a, b in zip(fast, plain, strict=True))
    assert stats["graphs"] and stats["dense_weights"]
    assert generate(model, tokenizer, examples, 16, 24, limit_bytes=10**12) == fast  # replays
    # random weights have nearly flat logits: past the first steps (checked above to match),
    # the static cache's masked attention and the dynamic cache's round differently enough to
    # flip a later token now and then (measured 21 of 24 answers identical on the H200)
    assert same >= 0.75 * len(examples), (same, len(examples))
