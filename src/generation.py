"""Batched greedy generation for the objectives that score free text (SQuAD, AlpacaEval) and
for the report's examples.

Plain `model.generate` on a trial's model is bound by the host: every decode step launches
thousands of small kernels (4-bit dequantization, LoRA's extra matmuls, norms) and grows a
dynamic KV cache; on the H200 a 0.5B step took 28 ms where reading the weights takes 0.2 ms
(`../shared/device/README.md`). So the fast path (`fast=True`, the default):

- a static KV cache (transformers' `StaticCache`) per batch size, prompts sorted by length
  (longest first) and left-padded; a cache is made as long as the batch that needs it
  (rounded up to a multiple of `BUCKET`) and serves every later batch of that size, whose
  prompts are no longer. Session 18 sized every cache for the job's longest prompt: the rows,
  planned again as prompts get shorter, still took 8 sizes on the 7B shape (8 set-ups, as
  with a cache per length), and each later cache was up to ~900 positions long for ~200-token
  prompts, which every prefill and decode step attends over. Sized per batch (session 19):
  more rows fit sooner, 5-6 set-ups, generation 15.4-15.8 s against 19.2 s
  (docs/bench/README.md);
- the prefill computes logits at the last position only;
- on CUDA each decode step (forward, argmax, bookkeeping) is one captured CUDA graph replayed
  per token: transformers' own `generate(cache_implementation="static")` reaches graphs only
  through torch.compile, which cannot trace bitsandbytes' kernels and recompiles per shape;
- 4-bit base weights dequantized once while generating, where that fits under `limit_bytes`
  (the trial's training peak), instead of twice per layer per step (`inference_weights`);
- rows that reached an end-of-turn token stop counting; a batch ends when all have (seen one
  step late: the host never makes the card wait to find out);
- a batch's rows are planned under `limit_bytes` from what the first batch measured, and
  planned again at each shorter cache length (later batches hold more rows).

Greedy answers are those of `model.generate` (tests/src/test_generation.py compares them);
`fast=False` runs `model.generate` itself (the whole-trial benchmark's plain trial, and the
default on the CPU: there the prefill's matmuls dominate, and a SQuAD demo trial generated
in 108 s on the fast path against ~25 s with `generate`, each new cache length paying
seconds of first-call set-up).
A batch that runs out of memory is retried at half the batch size (down to 1).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import time

import torch

from src import memory
from src.data import prompt_ids

BUCKET = 64  # cache lengths are rounded up to a multiple: batches of similar length share a graph


@torch.no_grad()
def generate(
    model,
    tokenizer,
    examples: list[dict],
    batch_size: int,
    max_new_tokens: int,
    fast: bool | None = None,
    limit_bytes: int | None = None,
    stats: dict | None = None,
) -> list[str]:
    """The model's answer to each example's `messages`, greedy, at most `max_new_tokens`,
    special tokens removed, in the examples' order. `stats` (a dict) gets what was done:
    batch size used, decode steps, generated tokens, seconds (all, and after the first batch),
    whether dense weights and CUDA graphs were used."""
    if fast is None:  # measured: the fast path pays on CUDA; on 2 CPU cores the prefill's
        fast = torch.cuda.is_available()  # compute dominates and it was slower (docs/bench)
    prompts = [prompt_ids(tokenizer, e["messages"]) for e in examples]
    stats = {} if stats is None else stats
    stats.update(rows=len(prompts), steps=0, tokens=0, seconds=0.0, after_first_s=0.0)
    stats.update(after_first_tokens=0, batches=0, retries=0, fast=fast)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    job = Job(prompts, max_new_tokens, pad, end_tokens(model, tokenizer), stats)
    was_training = model.training
    model.eval()
    try:
        while job.left():  # out of memory: the rest again at half the batch size
            try:
                job.run(model, batch_size, fast, limit_bytes)
            except torch.OutOfMemoryError:
                rows = stats["batch_size"]
                if rows == 1:
                    raise
                _release()
                batch_size = max(1, rows // 2)
                stats["retries"] += 1
    finally:
        model.train(was_training)
    return [tokenizer.decode(ids, skip_special_tokens=True) for ids in job.out]


class Job:
    """The prompts (longest first), the answers so far and what was done."""

    def __init__(self, prompts: list[list[int]], max_new: int, pad: int, eos: list, stats: dict):
        self.prompts, self.max_new, self.pad, self.eos = prompts, max_new, pad, eos
        self.stats = stats
        self.order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        self.done = 0
        self.out: list[list[int]] = [[] for _ in prompts]
        self.scale: float | None = None  # measured / estimated bytes per row (first batch)

    def left(self) -> bool:
        return self.done < len(self.order)

    def longest_left(self) -> int:
        return len(self.prompts[self.order[self.done]])

    def run(self, model, batch_size: int, fast: bool, limit_bytes: int | None) -> None:
        """The remaining prompts, up to `batch_size` at a time: fewer where the memory limit
        says so (`fitting_batch`, after the dense weights took theirs), re-planned from what
        the first batch really used, and again at each shorter prompt length, rounded as cache
        lengths are (prompts come longest first: later batches fit more rows, up to
        `batch_size`)."""
        dense_weights = inference_weights(model, limit_bytes) if fast else contextlib.nullcontext()
        with dense_weights as dense:
            self.stats["dense_weights"] = bool(dense)
            measure = fast and bool(limit_bytes) and torch.cuda.is_available()
            rows = fitting_batch(model, self, batch_size, limit_bytes) if fast else batch_size
            self.stats["batch_size"] = rows
            self.stats.setdefault("batch_sizes", [])
            before = torch.cuda.memory_reserved() if measure else 0
            runner = Runner(model, rows, self.max_new, self.pad, self.eos) if fast else None
            planned_for = None  # the prompt length (rounded) the measured plan was made for
            while self.left():
                if runner and self.scale is not None and planned_for != self.next_length():
                    rows = fitting_batch(model, self, batch_size, limit_bytes, before)
                    runner.rows = self.stats["batch_size"] = rows  # another size: a new cache
                    planned_for = self.next_length()
                chunk = self.order[self.done : self.done + rows]
                prompts = [self.prompts[i] for i in chunk]
                if rows not in self.stats["batch_sizes"]:
                    self.stats["batch_sizes"].append(rows)
                first = measure and self.scale is None
                need = self.row_need(model, max(map(len, prompts))) if first else 0
                started = time.perf_counter()
                if runner:
                    tokens = runner.generate(prompts)
                else:
                    tokens = plain_generate(model, prompts, self.max_new, self.pad, self.eos)
                _account(self.stats, tokens, time.perf_counter() - started)
                for i, ids in zip(chunk, tokens, strict=True):
                    self.out[i] = ids
                self.done += len(chunk)
                if need:  # the first batch's cost, cache and graph included
                    used = torch.cuda.max_memory_reserved() - before
                    self.scale = used / (rows * need)
            self.stats["graphs"] = bool(runner and runner.graphed)
            self.stats["row_scale"] = self.scale
            if runner:
                self.stats["decode_setups"] = self.stats.get("decode_setups", 0) + runner.setups
                self.stats["setup_s"] = self.stats.get("setup_s", 0.0) + runner.setup_s

    def next_length(self) -> int:
        """The cache length the next batch would need alone (its longest prompt comes first)."""
        return cache_length(self.longest_left(), self.max_new)

    def row_need(self, model, longest: int) -> int:
        """`row_bytes` estimated for a batch whose longest prompt has `longest` tokens, in a
        cache made for the next batch (`Runner`: a batch size keeps its cache, which is never
        shorter than a later batch needs)."""
        return row_bytes(parts(model)[2], self.next_length(), longest)


def _account(stats: dict, tokens: list[list[int]], seconds: float) -> None:
    generated = sum(len(t) for t in tokens)
    stats["tokens"] += generated
    stats["steps"] += max((len(t) for t in tokens), default=0)
    stats["seconds"] += seconds
    if stats["batches"]:  # the first batch pays one-off set-up (kernels, captures)
        stats["after_first_s"] += seconds
        stats["after_first_tokens"] += generated
    stats["batches"] += 1


def _release() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def end_tokens(model, tokenizer) -> list[int]:
    """Token ids that end an answer: the generation config's (Qwen: <|im_end|>, <|endoftext|>)
    and the tokenizer's end of sequence."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [] if ids is None else ([ids] if isinstance(ids, int) else list(ids))
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted(set(ids))


def _cut(ids: list[int], eos: list[int]) -> list[int]:
    """The answer up to and with its first end token (what `generate` keeps visible)."""
    for k, token in enumerate(ids):
        if token in eos:
            return ids[: k + 1]
    return ids


def _left_padded(prompts: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.tensor(p)
        mask[row, width - len(p) :] = 1
    return ids.to(device), mask.to(device)


def plain_generate(model, prompts, max_new: int, pad: int, eos: list[int]) -> list[list[int]]:
    """`model.generate` as a user calls it: dynamic cache, greedy."""
    ids, mask = _left_padded(prompts, pad, next(model.parameters()).device)
    generated = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=max_new,
        do_sample=False,
        pad_token_id=pad,
        use_cache=True,
    )
    return [_cut(row, eos) for row in generated[:, ids.shape[1] :].tolist()]


# --- the fast path --------------------------------------------------------------------------


def parts(model):
    """(decoder body, output head) of a causal LM, under PEFT's wrapper where there is one."""
    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    return causal.get_decoder(), causal.get_output_embeddings(), causal.config


def cache_length(prompt_len: int, max_new: int) -> int:
    return BUCKET * math.ceil((prompt_len + max_new) / BUCKET)


def row_bytes(config, length: int, prompt_len: int, dtype_bytes: int = 2) -> int:
    """Memory one batch row needs: its KV cache of `length` positions, and the prefill's
    largest transient activations (the MLP's intermediate, a few hidden-size tensors) and the
    last position's fp32 logits."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    cache = 2 * text.num_hidden_layers * kv_heads * head_dim * length * dtype_bytes
    prefill = prompt_len * (3 * text.intermediate_size + 8 * text.hidden_size) * dtype_bytes
    return cache + prefill + 4 * text.vocab_size


def fitting_batch(
    model, job: Job, batch_size: int, limit_bytes: int | None, held: int | None = None
) -> int:
    """`batch_size`, or fewer rows where the longest remaining batch would not fit under
    `limit_bytes` (the training peak as `src/memory.py` counts it) next to what the process
    holds (`memory.held_bytes` of the reservation `held`, default now; CUDA; elsewhere no
    limit): `plan_rows` with the job's measured correction of `row_bytes`."""
    if not limit_bytes or not torch.cuda.is_available():
        return batch_size
    need = job.row_need(model, job.longest_left())
    held = memory.held_bytes(held)  # with what lies outside the allocator now, as the limit
    return plan_rows(limit_bytes - held - MARGIN_BYTES, need, batch_size, job.scale)


def plan_rows(free: int, need: int, batch_size: int, scale: float | None) -> int:
    """Rows of `need` estimated bytes that fit in `free`. Before anything was measured
    (`scale` None) a batch that the estimate limits starts at half of what it allows: the
    estimate leaves out transients (on the H200, 7B SQuAD: 21 rows planned within an 11.5 GiB
    training peak, 13.4 GiB used, docs/bench/README.md), and the first batch (the longest
    prompts) sets the evaluation's peak. Once measured, `need * scale` is what a row costs."""
    if scale is None:
        return max(1, min(batch_size, free // need // 2))
    return max(1, min(batch_size, int(free // (need * scale))))


MARGIN_BYTES = 512 * 1024**2  # cuBLAS workspaces, the graph pool's slack, allocator rounding


class Runner:
    """Generates for batches of up to `rows` prompts: one `StaticCache` and one decode graph
    per batch size, the cache as long as the first batch of that size needs (prompts come
    longest first: later ones fit; a longer one gets a longer cache)."""

    def __init__(
        self,
        model,
        rows: int,
        max_new: int,
        pad: int,
        eos: list[int],
        keep_logits: bool = False,
    ):
        self.body, self.head, self.config = parts(model)
        # transformers renamed the decoder's cache argument (past_key_values -> cache)
        names = inspect.signature(self.body.forward).parameters
        self.cache_arg = "cache" if "cache" in names else "past_key_values"
        self.keep_logits = keep_logits  # every step's logits kept in `step.logits` (tests)
        self.device = next(model.parameters()).device
        self.rows, self.max_new, self.pad = rows, max_new, pad
        self.eos = torch.tensor(eos, device=self.device)
        self.graphed = False
        self.step = None
        self.setups, self.setup_s = 0, 0.0  # caches and decode graphs made, host seconds

    def generate(self, prompts: list[list[int]]) -> list[list[int]]:
        n = len(prompts)
        prompts = prompts + [prompts[-1]] * (self.rows - n)  # a fixed batch: fill the last
        longest = max(map(len, prompts))
        if self.step is not None and longest + self.max_new > self.step.length:
            self.step = None  # longer than this size's cache: a longer one
        if self.step is None or self.rows != self.step.rows:
            started = time.perf_counter()
            # the old cache and graph go before the new ones come: freed as their last
            # reference goes (no cycle holds a DecodeStep), their blocks handed back at once;
            # no collection here (a full pass walks the whole model: ~0.3 s on the H200)
            self.step = None
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self.step = DecodeStep(self, cache_length(longest, self.max_new))
            self.setups += 1
            self.setup_s += time.perf_counter() - started
        step = self.step
        ids, mask = _left_padded(prompts, self.pad, self.device)
        step.prefill(ids, mask)
        for _ in range(1, self.max_new):
            started = time.perf_counter() if step.graph is None else None
            step.run()
            if started is not None and step.graph is not None:  # it was captured: set-up
                self.setup_s += time.perf_counter() - started
            if step.finished():
                break
        tokens = step.out[:n].tolist()
        return [_cut(t, self.eos.tolist()) for t in tokens]


class DecodeStep:
    """A static cache of `length` positions and the buffers of one decode step: the current
    tokens, their positions, the attention mask over the cache, the next cache slot, the
    answers so far and which rows are done. `run` advances one token: a CUDA graph replay on
    CUDA (captured at the first call), the same code eagerly elsewhere."""

    def __init__(self, runner: Runner, length: int):
        from transformers import StaticCache

        self.r, self.rows, self.length = runner, runner.rows, length
        rows, device = runner.rows, runner.device
        self.cuda = device.type == "cuda"
        self.cache = StaticCache(config=runner.config, max_cache_len=length)
        self.tokens = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.mask = torch.zeros(rows, 1, 1, length, dtype=torch.bool, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self.index = torch.zeros(1, dtype=torch.long, device=device)
        self.out = torch.full((rows, runner.max_new), runner.pad, dtype=torch.long, device=device)
        self.done = torch.zeros(rows, dtype=torch.bool, device=device)
        self.all_done = torch.zeros((), dtype=torch.bool, device=device)
        # the host reads whether every row is done one step late (the next step already
        # queued): the card never waits on that read, and a batch runs at most one step past
        # its end (looking every 8 steps ran ~4 steps too many per SQuAD batch on the H200)
        self.seen = torch.zeros((), dtype=torch.bool, pin_memory=self.cuda)
        self.flag = torch.cuda.Event() if self.cuda else None
        vocab = runner.head.weight.shape[0]
        shape = (rows, runner.max_new, vocab) if runner.keep_logits else (0,)
        self.logits = torch.zeros(shape, dtype=torch.float32, device=device)
        self.graph = None
        # sdpa takes the boolean mask; eager attention adds a float one
        self.additive = getattr(runner.config, "_attn_implementation", "sdpa") == "eager"

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor) -> None:
        """The prompts into the cache (eagerly: one call per batch), the first token from the
        last position's logits, the decode buffers set for the next step."""
        self.cache.reset()
        width = ids.shape[1]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as `generate`: padding at 0
        hidden = self.r.body(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **{self.r.cache_arg: self.cache},
        ).last_hidden_state
        logits = self.r.head(hidden[:, -1])
        first = logits.argmax(-1)
        if self.r.keep_logits:
            self.logits[:, 0] = logits.float()
        self.tokens.copy_(first[:, None])
        self.positions.copy_(mask.sum(-1, keepdim=True))
        self.mask.zero_()
        self.mask[:, 0, 0, :width] = mask.bool()
        self.slot.fill_(width)
        self.out.fill_(self.r.pad)
        self.out[:, 0] = first
        self.index.fill_(1)
        self.done.copy_(torch.isin(first, self.r.eos))
        self.all_done.copy_(self.done.all())
        self._flag()

    def _step(self) -> None:
        self.mask.index_fill_(-1, self.slot, True)  # the slot this token's keys go into
        mask = self.mask
        if self.additive:
            low = torch.finfo(self.r.head.weight.dtype).min
            mask = torch.zeros(mask.shape, dtype=self.r.head.weight.dtype, device=mask.device)
            mask = mask.masked_fill(~self.mask, low)
        hidden = self.r.body(
            input_ids=self.tokens,
            attention_mask=mask,  # 4-D: used as is, no mask building (no host sync)
            position_ids=self.positions,
            use_cache=True,
            **{self.r.cache_arg: self.cache},
        ).last_hidden_state
        logits = self.r.head(hidden[:, -1])
        if self.r.keep_logits:
            self.logits.index_copy_(1, self.index, logits.float()[:, None])
        token = torch.where(self.done, self.r.pad, logits.argmax(-1))
        self.out.index_copy_(1, self.index, token[:, None])
        self.done |= torch.isin(token, self.r.eos)
        self.all_done.copy_(self.done.all())
        self.tokens.copy_(token[:, None])
        self.positions.add_(1)
        self.slot.add_(1)
        self.index.add_(1)

    def run(self) -> None:
        if not self.cuda:
            self._step()
            return
        if self.graph is None:
            self.graph = self._capture()
            self.r.graphed = True
        self.graph.replay()

    def finished(self) -> bool:
        """Whether every row was done by the step before the last one run (CUDA: read one
        step late, without waiting for the last one), or by the last one (elsewhere)."""
        if not self.cuda:
            return bool(self.all_done)
        self.flag.synchronize()  # the step before the last: the last one is queued meanwhile
        done = bool(self.seen)
        self._flag()
        return done

    def _flag(self) -> None:
        """Have `all_done` copied to the host once the work queued so far is done."""
        if self.cuda:
            self.seen.copy_(self.all_done, non_blocking=True)
            self.flag.record()

    def _capture(self) -> torch.cuda.CUDAGraph:
        """Warm the step up twice on a side stream (lazy cuBLAS and Triton set-up may not
        happen inside a capture), put every buffer back as it was, capture."""
        saved = self._state()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._step()
        torch.cuda.current_stream().wait_stream(side)
        self._restore(saved)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self._step()
        return graph

    def _state(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        counters = [layer.cumulative_length for layer in self.cache.layers]
        mutable = [
            self.tokens,
            self.positions,
            self.mask,
            self.slot,
            self.index,
            self.out,
            self.done,
            self.all_done,
        ]
        return [(t, t.clone()) for t in [*mutable, *counters]]

    @staticmethod
    def _restore(saved) -> None:
        for tensor, copy in saved:
            tensor.copy_(copy)


# --- dense weights while generating ---------------------------------------------------------


@contextlib.contextmanager
def inference_weights(model, limit_bytes: int | None):
    """While inside: the 4-bit base weight of every fused LoRA layer (src/fused_lora.py) is
    dequantized once and kept, instead of at every call, when all of them fit under
    `limit_bytes` next to what the process holds now (no limit given, or no CUDA: never on the
    GPU, always on the CPU, where memory is host memory). The LoRA product stays apart, as in
    training: the numbers are those of the 4-bit path to the bit (merging B @ A into bf16
    weights rounds them, and on random weights that changed half the greedy answers). Yields
    whether it did; the model is left as it was."""
    from src.fused_lora import is_fused, quantized

    bases = [
        m.base_layer
        for m in model.modules()
        if is_fused(m) and isinstance(m.base_layer, torch.nn.Linear) and quantized(m.base_layer)
    ]
    if not bases or not _fits(bases, limit_bytes):
        yield False
        return
    import bitsandbytes.functional as bnb_functional

    try:
        for base in bases:
            base.inference_weight = bnb_functional.dequantize_4bit(
                base.weight.data, base.weight.quant_state
            )
        yield True
    finally:
        for base in bases:
            base.__dict__.pop("inference_weight", None)
        _release()


def _fits(bases: list, limit_bytes: int | None) -> bool:
    if not torch.cuda.is_available():
        return True
    if not limit_bytes:
        return False
    need = sum(b.out_features * b.in_features for b in bases) * 2
    return memory.held_bytes() + need + MARGIN_BYTES < limit_bytes
