"""Batched greedy generation and the local judge on a tiny random Qwen2."""

from __future__ import annotations

import contextlib

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from objectives.common import chat
from objectives.judges import local_judge
from src.generation import generate


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


def _adapted(model_dir):
    """A trial's model on the CPU: 4-bit base, LoRA with non-zero B, fused LoRA layers."""
    from src import fused_lora, models

    model = models.add_lora(
        models.load_4bit_model(str(model_dir), torch.float32), 8, 16, 0.0, "all-linear", False
    )
    torch.manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.02)
    assert fused_lora.fuse_lora(model) > 0
    return model, models.load_tokenizer(str(model_dir))


def test_fast_path_answers_as_generate_does(tiny_model):
    """Static cache, sorted batches with a filled last batch, early stop, dense weights: the
    same greedy answers as `model.generate`, and the model left as it was."""
    model, tokenizer = _adapted(tiny_model)
    questions = ["Hi", "What is the capital of France?", "2+2?", "Tell me a story", "Why?"] * 2
    examples = [{"messages": chat(q, None)} for q in questions]
    stats = {}
    fast = generate(model, tokenizer, examples, 4, 12, fast=True, stats=stats)
    plain = generate(model, tokenizer, examples, 4, 12, fast=False)
    assert fast == plain and all(fast)
    assert stats["dense_weights"] and stats["batches"] == 3 and stats["tokens"] > 0
    assert not any(hasattr(m, "inference_weight") for m in model.modules())


def test_batches_of_shorter_prompts_reuse_the_first_batch_s_cache(tiny_model):
    """One cache (and, on CUDA, one decode graph) for every batch of one size, however much
    shorter its prompts: the answers stay those of `generate`."""
    model, tokenizer = _adapted(tiny_model)
    long = "Tell me everything about the history of the city of Paris and of France. " * 6
    questions = [long + str(i) for i in range(3)] + [f"Why {i}?" for i in range(5)]
    examples = [{"messages": chat(q, None)} for q in questions]
    stats = {}
    fast = generate(model, tokenizer, examples, 2, 6, fast=True, stats=stats)
    plain = generate(model, tokenizer, examples, 2, 6, fast=False)
    assert fast == plain and all(fast)
    assert stats["batches"] == 4 and stats["decode_setups"] == 1 and stats["setup_s"] > 0


def test_a_replaced_decode_step_is_freed_without_a_collection(tiny_model):
    """Another batch size drops the old cache (and, on CUDA, its graph) as its last reference
    goes: the runner does not pay a garbage collection for it. The new cache is as long as
    the batch that made it needs, not as the first batch's."""
    import gc
    import weakref

    from src.generation import Runner, cache_length

    model, tokenizer = _adapted(tiny_model)
    long = tokenizer("Tell me about Paris and France. " * 20)["input_ids"]
    short = tokenizer("Why?")["input_ids"]
    runner = Runner(model, 2, 4, 0, [-1])
    gc.disable()
    try:
        with torch.no_grad():
            runner.generate([long, short])
            old = weakref.ref(runner.step)
            assert runner.step.length == cache_length(len(long), 4) > cache_length(len(short), 4)
            runner.rows = 1
            runner.generate([short])
        assert old() is None and runner.step.rows == 1 and runner.setups == 2
        assert runner.step.length == cache_length(len(short), 4)
        with torch.no_grad():  # a longer prompt than the cache holds: a longer cache
            assert runner.generate([long]) and runner.step.length == cache_length(len(long), 4)
        assert runner.setups == 3
    finally:
        gc.enable()


@pytest.mark.integration
def test_fast_path_on_the_embedded_model_answers_squad_as_generate(embedded_model, shared_data):
    """Issue 17: on the real embedded model, >= 99 % of >= 200 SQuAD answers identical."""
    from objectives import squad

    model, tokenizer = _adapted(embedded_model)
    rows = squad.load(shared_data, 1, 1, 200, 0, "")[2]
    fast = generate(model, tokenizer, rows, 16, 16, fast=True)
    plain = generate(model, tokenizer, rows, 16, 16, fast=False)
    same = sum(a == b for a, b in zip(fast, plain, strict=True))
    assert len(rows) == 200 and same >= 0.99 * len(rows), same


def test_a_batch_is_planned_from_the_estimate_then_from_the_first_batch_s_cost():
    """Ample memory: the study's batch. Limited and nothing measured yet: half of what the
    estimate allows (the first batch, the longest prompts, sets evaluation's peak). Measured:
    rows of `need * scale` bytes, more where the estimate was too high, never below one."""
    from src.generation import plan_rows

    need = 100
    assert plan_rows(free=100 * need, need=need, batch_size=16, scale=None) == 16
    assert plan_rows(free=20 * need, need=need, batch_size=32, scale=None) == 10
    assert plan_rows(free=20 * need, need=need, batch_size=32, scale=1.5) == 13
    assert plan_rows(free=20 * need, need=need, batch_size=32, scale=0.8) == 25
    assert plan_rows(free=20 * need, need=need, batch_size=16, scale=0.8) == 16
    assert plan_rows(free=-need, need=need, batch_size=16, scale=None) == 1
    assert plan_rows(free=need // 2, need=need, batch_size=16, scale=2.0) == 1


def test_rows_are_planned_again_at_each_shorter_cache_length(tiny_model, monkeypatch):
    """Under a memory limit, the first batch (the longest prompts) runs with the estimate's
    rows, the next with the rows its measured cost allows, and once the cache gets shorter
    with more rows: the answers stay those of `generate` throughout."""
    from src import generation

    model, tokenizer = _adapted(tiny_model)
    long = "Tell me everything about the history of the city of Paris and of France. " * 4
    questions = [long + str(i) for i in range(5)] + [f"Why {i}?" for i in range(8)]
    examples = [{"messages": chat(q, None)} for q in questions]
    lengths = []

    def fitting(model, job, batch_size, limit_bytes, held=None):  # the plan, by prompt length
        lengths.append(job.next_length())
        if job.scale is None:
            return 1
        return 2 if job.longest_left() > 64 else 4

    monkeypatch.setattr(generation, "fitting_batch", fitting)
    monkeypatch.setattr(generation, "inference_weights", lambda m, limit: _no_dense())
    monkeypatch.setattr(generation, "_release", lambda: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda: 0)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda: 10**6)
    stats = {}
    fast = generate(model, tokenizer, examples, 8, 6, fast=True, limit_bytes=10**9, stats=stats)
    monkeypatch.undo()
    plain = generate(model, tokenizer, examples, 8, 6, fast=False)
    assert fast == plain and all(fast)
    assert len(set(lengths)) == 2  # planned at the start, after the first batch, when shorter
    assert stats["batch_sizes"] == [1, 2, 4] and stats["batches"] == 1 + 2 + 2
    assert stats["row_scale"] is not None and stats["decode_setups"] == 3  # one a batch size


@contextlib.contextmanager
def _no_dense():
    yield False


def test_a_batch_is_planned_with_what_lies_outside_the_allocator_now(monkeypatch):
    """The limit is the training peak as the objective counts it (the reservation plus what
    lies outside the allocator); planning counts the outside part as it is now: grown since
    (kernels loaded, graphs' executables), it leaves fewer rows; without NVML the reservation
    alone counts, on both sides."""
    from types import SimpleNamespace

    from src import generation, memory

    gib = 1024**3
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda: 4 * gib)
    job = SimpleNamespace(row_need=lambda model, n: gib // 4, longest_left=lambda: 100, scale=1.0)
    outside = [gib]
    monkeypatch.setattr(memory, "nvml_reader", lambda: lambda: 4 * gib + outside[0])
    limit = 5 * gib + generation.MARGIN_BYTES + 2 * gib  # training: 4 + 1 GiB, 2 GiB to spare
    assert generation.fitting_batch(None, job, 64, limit) == 8
    outside[0] += gib // 2
    assert generation.fitting_batch(None, job, 64, limit) == 6
    assert generation.fitting_batch(None, job, 64, limit, held=3 * gib) == 10  # a reservation
    monkeypatch.setattr(memory, "nvml_reader", lambda: None)
    assert generation.fitting_batch(None, job, 64, limit) == 12
