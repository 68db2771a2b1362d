"""Checkpointed decoder layers replayed as CUDA graphs: one graph for a layer's forward, one
for its recomputation and backward, per batch shape.

Why: a 0.5B model's training step is bound by the host launching ~8,000 small kernels (the
GPU idles 84 % of a step, docs/bench/README.md); a graph replays a layer's hundreds of
kernels with one launch. torch.compile's "reduce-overhead" mode graphs only what it traces
(not bitsandbytes' or Liger's kernels inside a checkpoint), and `make_graphed_callables`
cannot hold a checkpointed layer: checkpointing reads the RNG state, which a capture forbids.
So the checkpoint is written here, around the graphs: the forward graph runs the layer
without keeping activations; the backward graph recomputes it with autograd and returns the
input's and the LoRA weights' gradients. Dropout in both replays draws the same masks: the
generator is set back to its state at the forward before the backward replays (a captured
graph draws its random numbers from the generator's offset at replay).

Shapes must repeat for graphs to pay: `speed.PaddingFree(bucket=True)` pads each batch to one of
a few lengths. Graphs also pay only where the host launching a layer's kernels is slower than
the card running them: on the H200 a 0.5B layer is (the card idled 84 % of a step), while a 7B
step of 1024 x 8 tokens took the same time with and without graphs and the captures of a
100-step 7B SQuAD trial cost 8 s (docs/bench/README.md). So each new input signature is measured
first: the first layer to see it runs it eagerly, and at the `PROBE_AT`-th sight (the first may
set up kernels lazily; in training any layer's sight counts, so the second layer of the first
step is timed; in evaluation the first layer's own, at `EVAL_PROBES` sights from there) the
host's launching is timed against the card's run of the same call. Only a signature where the
card waited for the host (`HOST_BOUND`) is captured, at its next sight, by every layer (the
first layer to capture it runs it twice eagerly on a side stream first, so lazy initialisation
happens outside a capture); past `MAX_SHAPES` per layer, or for an input it cannot key, the
layer runs the same checkpoint eagerly. A probe also decides for the signatures of its kind
(same mode, hidden size, dtypes, arguments) that it bounds (`judged`): the host's launching does
not depend on the token count while the card's work grows with it, at most in proportion (a
fixed part per kernel, then linear: packed rows keep attention per token bounded), so a probe's
ratio of card to host time scaled by the token counts bounds another signature's: one with more
tokens than a host-bound probe is host-bound too while the probe's ratio times their token ratio
stays within `HOST_BOUND` (the card's time measured where it waited for the host is an upper
bound of its work, so the estimate errs towards the card; training signatures only: a
forward-only one is judged from as many tokens or more, see `judged`), and one with fewer tokens
than a card-bound probe is card-bound while that product stays above it. Such a signature is
captured at its first sight or runs eagerly, unprobed; a packed training length only where the
trainer's padding plan expects the batches left to bring it again (`GraphSet.again`,
`shapes.Plan.recurs`), and a forward-only signature only where the validations left are expected
to (`GraphSet.begin_pass`): a shape seen once is not worth its capture or its buffers. Measured
on the H200 before this extrapolation (session 24): a 7B SQuAD trial probed 3 training lengths
(1,920, 2,304 and 2,560 tokens, ratios 0.99-1.00), each probe an eager step (~0.29 s more than a
graphed one) before its capture; the first probe alone bounds the other two (1,920 x 1.5 = 2,880
tokens). Measured on the H200 (docs/bench/README.md, session 19): every training probe of a 0.5B
AlpacaEval or 7B SQuAD trial found the card waiting, and the two eager sights per shape before
each capture cost the 0.5B trial ~5 s of 18 s of training. Evaluation in eval mode without
gradients (the Trainer's validation loss) replays a forward-only graph per shape, probed the
same way: validation took 31 % of a 0.5B SST-2 trial's training loop with eager layers (py-spy,
docs/bench/README.md). Anything else without gradients (generation with its KV cache) runs the
layers as they are. Adapters only: with full fine-tuning each graph would hold a copy of its
layer's weight gradients (src/train_qlora.py).
"""

from __future__ import annotations

import contextlib
import gc
import math
import time
from collections import Counter
from functools import partial

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from src import fused_lora

MAX_SHAPES = 16  # graphs kept per layer: each shape's pair holds its static buffers
PROBE_AT = 2  # the sight of a new signature that is timed (0: capture at first sight, untimed)
# captured where the card's time for the probed call is at most this multiple of the host's
# launching time: after a synchronize, a card that waits for the launches finishes right
# after the host (ratio ~1); a card with work of its own to do takes longer. Measured on the
# H200 (docs/bench/README.md): 7B SQuAD training shapes gave 1.0-1.35 (the same 2,560-token
# shape 1.10 in one call, 1.35 in the next) and graphs paid there (median step 0.270 s against
# 0.485 s eager, session 17); its validation batches of ~7,500 tokens gave 1.7-2.7 (sessions
# 18-19) and ran eagerly (validation in uncaptured batches of 32: 3.4 s against 5.3 s in
# graphed batches of 8, session 18)
HOST_BOUND = 1.5
# timings of a forward-only (validation) signature, at consecutive sights, of which the one
# with the least host time decides: a host that stalled once (another thread, the allocator)
# looks launch-bound, and validation's shapes sit near the bound at 7B, where each capture
# adds its buffers to the training peak, the memory objective. One timing decided in
# session 22: the same 7B SQuAD configuration captured 0, 56 and 2 validation graphs in three
# processes (host 3.4-7.4 ms against the card's 7.9-10.5 ms) and its training peak moved by
# up to 3 % (13.59 / 14.02 / 13.92 GiB; docs/bench/README.md). Training signatures keep one
# timing: every one measured at 7B or 0.5B was well inside the bound (1.0-1.35), and each
# eager sight of a 7B training step costs ~0.2 s.
EVAL_PROBES = 2
TIMED = 4  # replays of a packed training length timed on one layer (`GraphSet.shape_costs`)
# a forward-only (validation) signature's graphs are captured only where the validations left
# are expected to bring it at least this many more times: the rule of packed training lengths
# (`shapes.RECUR`: a capture costs about two eager calls of host time and holds its buffers).
# Measured on the H200 (session 26): a 30-step 0.5B SST-2 trial with two validations of 64
# rows captured 48 forward-only graphs (of 120 in 2.5 s, 16 trials packed) that its second
# validation replayed once at most. A/B of this rule (session 27, docs/bench/s27/ab): 19 graphs
# instead of 48, capture 1.5 -> 1.2 s, the training peak 9 MiB lower, the training loop no
# faster (the last validation's eager calls cost about what the captures had)
FORWARD_RECUR = 2.0


class Checkpoint(torch.autograd.Function):
    """Keep only the layer's input; in backward, run `runner.backward` under the RNG state the
    forward saw. `runner`: `Eager` (any device) or `Replay` (CUDA graphs)."""

    @staticmethod
    def forward(ctx, runner, hidden, *params):
        ctx.runner, ctx.rng = runner, _rng_state(hidden.device)
        ctx.save_for_backward(hidden)
        return runner.forward(hidden)

    @staticmethod
    def backward(ctx, grad):
        (hidden,) = ctx.saved_tensors
        with _rng_replayed(hidden.device, ctx.rng):
            grad_in, grad_params = ctx.runner.backward(hidden, grad)
        return None, grad_in, *grad_params


def _rng_state(device: torch.device) -> torch.Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


@contextlib.contextmanager
def _rng_replayed(device: torch.device, state: torch.Tensor):
    now = _rng_state(device)
    _set_rng_state(device, state)
    try:
        yield
    finally:
        _set_rng_state(device, now)


def _set_rng_state(device: torch.device, state: torch.Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


class Eager:
    """The layer run as plain code: forward without autograd, backward recomputes it."""

    def __init__(self, run, params, autocast, keep: bool = False):
        self.run, self.params, self.autocast, self.keep = run, params, autocast, keep

    def forward(self, hidden):
        return self.run(hidden)

    def backward(self, hidden, grad):
        x = hidden.detach().requires_grad_()
        return _recompute_grads(self.run, x, self.params, grad, self.autocast, self.keep)


def _recompute_grads(run, x, params, grad, autocast, keep: bool = False) -> tuple:
    """Run the layer again on the leaf `x` under the forward's autocast and return the
    gradients of `x` and of `params` (zeros for a parameter the output does not reach).
    `keep`: its 4-bit weights dequantized once for both (`fused_lora.weights_kept`)."""
    with torch.enable_grad(), _autocast(x.device, autocast):
        with fused_lora.weights_kept(keep):
            out = run(x)
        grads = torch.autograd.grad(out, [x, *params], grad, allow_unused=True)
    param_grads = [
        torch.zeros_like(p) if g is None else g for g, p in zip(grads[1:], params, strict=True)
    ]
    return grads[0], param_grads


def _autocast(device: torch.device, autocast: torch.dtype | None):
    """The autocast state of the forward, for the recomputation (the backward runs outside
    it). Without the autocast cache: a weight cast during a capture must not outlive it."""
    if autocast is None:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=autocast, cache_enabled=False)


def _warm_up(shared: GraphSet, device: torch.device, step) -> None:
    """Lazy initialisation (cuBLAS, Triton) outside captures: `step` twice on the side stream,
    once per shape. Its host seconds are counted apart (`warm_up_s`, part of `capture_s`): a
    profile of 7B captures outside the trial path put it at 0.18-0.32 s of 0.77-0.86 s a
    length (session 25, docs/bench/README.md)."""
    started = time.perf_counter()
    side = shared.side_stream
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream(device).wait_stream(side)
    shared.stats["warm_up_s"] += time.perf_counter() - started


@contextlib.contextmanager
def _no_collection():
    """Python's cycle collector off during a capture: objects it frees may free CUDA memory
    (another model's graph pool: `cudaFree`), which invalidates the capture. The likely cause
    of a failed capture on the H200 (session 24, "operation failed due to a previous error
    during capture" in a model's first backward capture, right after another graphed model
    was let go while a reference cycle held its graphs: that cycle is gone too)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _capture_forward(run, autocast, statics: Statics, shared: GraphSet) -> torch.cuda.CUDAGraph:
    """The layer's forward without autograd, from the static input to the static output."""
    graph = torch.cuda.CUDAGraph()
    # torch.cuda.graph waits for the card and empties the caching allocator before each
    # capture. Capturing without that (capture_begin on the side stream, as ReaLHF does for
    # its recaptures) was measured in session 23 and dropped: captures took no less time (7B
    # SQuAD 3.0-4.0 s for 195 graphs, 0.5B AlpacaEval 5.3 s against 3.9 s for 432) and the
    # training peak, the memory objective, rose (0.5B 5.01 -> 6.34 GiB, 7B ~+0.4 GiB): the
    # graphs' pool grew beside a cache that was no longer given back (docs/bench/README.md)
    with (
        _no_collection(),
        torch.cuda.graph(graph, pool=shared.pool, capture_error_mode="thread_local"),
        torch.no_grad(),
        _autocast(statics.hidden.device, autocast),
    ):
        statics.out.copy_(run(statics.hidden))
    return graph


class Graphs:
    """One layer's captured forward and backward for one input signature. Inputs and outputs
    live in the signature's `Statics`, shared by all layers (their replays never overlap and
    each output is copied out at once); only the LoRA gradients are the layer's own."""

    def __init__(self, run, params, autocast, statics: Statics, shared: GraphSet, warm: bool,
                 keep: bool = False):  # fmt: skip
        self.statics = statics
        self.samples: list | None = None  # timed replays (card events), where this is timed
        recompute = partial(_recompute_grads, run, statics.hidden, params, statics.grad_out,
                            autocast, keep)  # fmt: skip
        if not warm:
            _warm_up(shared, statics.hidden.device, recompute)
        self.forward_graph = _capture_forward(run, autocast, statics, shared)
        self.backward_graph = torch.cuda.CUDAGraph()
        with (
            _no_collection(),
            torch.cuda.graph(
                self.backward_graph, pool=shared.pool, capture_error_mode="thread_local"
            ),
        ):
            grad_in, self.grad_params = recompute()
            statics.grad_in.copy_(grad_in)


class ForwardGraph:
    """One layer's forward for one input signature in evaluation (eval mode, no gradients)."""

    def __init__(self, run, autocast, statics: Statics, shared: GraphSet, warm: bool):
        self.statics = statics
        if not warm:

            def forward():
                with torch.no_grad(), _autocast(statics.hidden.device, autocast):
                    run(statics.hidden)

            _warm_up(shared, statics.hidden.device, forward)
        self.graph = _capture_forward(run, autocast, statics, shared)

    def __call__(self, sources: list, hidden: torch.Tensor) -> torch.Tensor:
        self.statics.fill(sources, hidden)
        self.graph.replay()
        return self.statics.out.clone()


class Replay:
    """One call's runner over a layer's graphs (the inputs copied into the static buffers
    first; the mask and rotary embeddings only when they are not the ones already there)."""

    def __init__(self, graphs: Graphs, sources: list):
        self.graphs, self.sources = graphs, sources
        samples = graphs.samples
        # card events around both replays, where this layer's length is timed: never read
        # here (no wait), only by `GraphSet.shape_costs` once the card passed them
        timed = samples is not None and len(samples) < TIMED
        self.events = [torch.cuda.Event(enable_timing=True) for _ in range(4)] if timed else None

    def forward(self, hidden):
        statics = self.graphs.statics
        statics.fill(self.sources, hidden)
        self._replay(self.graphs.forward_graph, 0)
        return statics.out.clone()

    def backward(self, hidden, grad):
        statics = self.graphs.statics
        statics.fill(self.sources, hidden)
        with torch.no_grad():
            statics.grad_out.copy_(grad)
        self._replay(self.graphs.backward_graph, 2)
        if self.events is not None and len(self.graphs.samples) < TIMED:
            self.graphs.samples.append(self.events)
        return statics.grad_in.clone(), [t.clone() for t in self.graphs.grad_params]

    def _replay(self, graph: torch.cuda.CUDAGraph, first: int) -> None:
        if self.events is None:
            graph.replay()
            return
        self.events[first].record()
        graph.replay()
        self.events[first + 1].record()


class Statics:
    """The static buffers of one input signature, shared by all layers: the hidden states in
    and out, their gradients, and copies of the other tensor inputs (every layer gets the
    same mask and rotary embeddings: copied once per new source)."""

    def __init__(self, sources: list, hidden: torch.Tensor, gradients: bool = True):
        self.buffers = [t.clone() for t in sources]
        self.current = list(sources)
        self.hidden = torch.empty_like(hidden).requires_grad_()  # a leaf, for input gradients
        self.out = torch.zeros_like(hidden)
        # an evaluation signature needs no gradient buffers (at 7B, 32k tokens: 235 MB each)
        self.grad_out, self.grad_in = (
            (torch.zeros_like(hidden), torch.zeros_like(hidden)) if gradients else (None, None)
        )

    def fill(self, sources: list, hidden: torch.Tensor) -> None:
        with torch.no_grad():
            self.hidden.copy_(hidden)
            for i, source in enumerate(sources):
                if source is not self.current[i]:
                    self.buffers[i].copy_(source)
                    self.current[i] = source


class GraphSet:
    """What all graphed layers of one model share: the memory pool (its graphs never run at
    once, and what they output stays referenced, so no capture reuses it), the static
    buffers per signature, and the side stream that warms a new signature up."""

    def __init__(self):
        self.pool = torch.cuda.graph_pool_handle()
        self.side_stream = torch.cuda.Stream()
        self.statics: dict = {}  # (gradients, signature) -> Statics
        self.warm: set = set()  # (gradients, signature) warmed up
        self.worth: dict = {}  # (gradients, signature) -> whether its graphs pay (measured)
        self.ratios: dict = {}  # the same -> its probe's card time / host time (measured)
        self.inferred: dict = {}  # the same, decided from the measured ones (`judged`)
        # (gradients, signature) -> [the layer probing it, its sights, its (host, card) timings]
        self.sights: dict = {}
        self.layers = 0  # graphed layers sharing this set
        self.timer = None  # id of the layer whose replays of packed training lengths are timed
        self.timed: dict = {}  # packed training length -> the timer's `Graphs` for it
        # packed training length -> whether the batches left make its capture pay
        # (`shapes.Plan.recurs`, set by the trainer); None: every judged length is captured
        self.recurs = None
        self.captures: dict = {}  # packed training length -> [capture seconds, layers]
        # forward-only passes over the same batches (the Trainer's validations) still to come
        # after the current one (`begin_pass`); None: not known, every judged signature is
        # captured. Layer calls per forward-only signature in this pass and in the last one.
        self.passes_left: int | None = None
        self.this_pass: Counter = Counter()
        self.last_pass: Counter = Counter()
        # what the trial's result records: graphs captured (a layer's forward+backward pair
        # counts one), host seconds spent warming up and capturing, calls run eagerly, and
        # each probe: [gradients, tokens, host ms, card ms, captured]
        self.stats = {
            "training": 0,
            "evaluation": 0,
            "capture_s": 0.0,
            "warm_up_s": 0.0,  # of capture_s: the side stream's warm-ups (`_warm_up`)
            "eager_calls": 0,
            "probes": [],
            "inferred": 0,
        }

    def shape_costs(self) -> dict:
        """{packed training length: (host seconds capturing every layer's graphs, or None
        while not every layer has; card seconds of one step's graphed layers, from the
        least of the timer's timed replays that the card has passed, or None)}: what
        `shapes.Plan` weighs."""
        costs = {}
        for tokens, (seconds, layers) in self.captures.items():
            capture = seconds * self.layers / layers if layers >= self.layers else None
            costs[tokens] = (capture, self._step_s(tokens))
        return costs

    def _step_s(self, tokens: int) -> float | None:
        graphs = self.timed.get(tokens)
        done = [e for e in graphs.samples if e[3].query()] if graphs is not None else []
        if not done:
            return None
        ms = min(e[0].elapsed_time(e[1]) + e[2].elapsed_time(e[3]) for e in done)
        return self.layers * ms / 1e3

    def again(self, hidden: torch.Tensor, signature: tuple) -> bool:
        """Whether a new signature's graphs may be captured now as far as its recurrence goes:
        a packed training length only where `recurs` says the batches left bring it again, a
        forward-only one only where the passes left are expected to bring it `FORWARD_RECUR`
        more times (`sights_to_come`); anything else always."""
        gradients = signature[0]
        if not gradients:
            return self.passes_left is None or self.sights_to_come(signature) >= FORWARD_RECUR
        tokens = _packed_length(hidden, gradients)
        return tokens is None or self.recurs is None or self.recurs(tokens)

    def begin_pass(self, passes_left: int | None) -> None:
        """A forward-only pass over the same batches as the last one begins (a validation),
        with `passes_left` more to come after it."""
        self.last_pass, self.this_pass = self.this_pass, Counter()
        self.passes_left = passes_left

    def sights_to_come(self, signature: tuple) -> float:
        """How many more times a layer is expected to see forward-only `signature` after its
        call now: the rest of this pass as in the last one, and each pass left as the larger of
        the two (the passes go over the same batches)."""
        layers = max(self.layers, 1)
        done, last = self.this_pass[signature], self.last_pass[signature]
        per_pass = max(last / layers, math.ceil(done / layers))  # in sights
        return self.passes_left * per_pass + max(0, last - done) // layers

    def judge(self, signature: tuple) -> bool | None:
        """Whether `signature`'s graphs pay: measured, else decided by the measured ones of its
        kind (`judged`), else None (not known yet: probe it)."""
        worth = self.worth.get(signature, self.inferred.get(signature))
        if worth is None:
            worth = judged(self.ratios, signature)
            if worth is not None:
                self.inferred[signature] = worth
                self.stats["inferred"] += 1
        return worth

    def probed(self, layer, signature: tuple, hidden: torch.Tensor, run):
        """`run()`, timed when `layer` probes `signature` now (see the module's docstring). A
        training signature's sights are counted over all layers: the first layer's call sets
        kernels up lazily and the second layer's, in the same step, is timed, so the layers
        after it capture in the signature's first step (counted per layer, the first layer
        timed it a step later and every layer captured it a step after that: a 7B SQuAD trial
        ran its first three steps eagerly, ~0.16 s dearer each than graphed, session 25). A
        forward-only signature's sights stay the first layer's: its `EVAL_PROBES` timings
        should be a pass apart, not one stall of the host (the allocator, another thread) apart."""
        if PROBE_AT == 0 or self.judge(signature) is not None:
            return run()
        if not signature[0] and not self.again(hidden, signature):
            return run()  # not captured whatever its timing says: no probe
        sight = self.sights.setdefault(signature, [layer, 0, []])
        if sight[0] is not layer and not signature[0]:
            return run()  # forward-only: its sights are the first layer's (see the docstring)
        sight[1] += 1
        if sight[1] < PROBE_AT:
            return run()
        torch.cuda.synchronize(hidden.device)
        start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
        began = time.perf_counter()
        start.record()
        out = run()
        end.record()
        host_s = time.perf_counter() - began
        end.synchronize()
        timings = sight[2]
        timings.append((host_s, start.elapsed_time(end) / 1e3))
        if len(timings) < (1 if signature[0] else EVAL_PROBES):
            return out
        host_s, card_s = min(timings)  # the least host time and the card's with it
        worth = self.worth[signature] = card_s <= HOST_BOUND * host_s
        self.ratios[signature] = card_s / host_s if host_s > 0 else math.inf
        tokens = hidden.numel() // hidden.shape[-1]
        self.stats["probes"].append(
            [signature[0], tokens, round(host_s * 1e3, 3), round(card_s * 1e3, 3), worth]
        )
        return out


def _packed_length(hidden: torch.Tensor, gradients: bool) -> int | None:
    """The token count of a packed training batch (one row of hidden states, with gradients):
    what `shapes.Plan` pads to and prices; None for anything else."""
    if gradients and hidden.dim() == 3 and hidden.shape[0] == 1:
        return hidden.shape[1]
    return None


def judged(ratios: dict, signature: tuple) -> bool | None:
    """What the probes say of `signature`, a `(gradients, hidden shape, *the rest)` of the
    layer's key. `ratios`: each probed signature's card time / host time. Among those of its
    kind (all but the token count and the other tensors' shapes), a probe with `n` tokens and
    ratio `r` bounds the ratio at `tokens` by `r * tokens / n`: from above where `tokens >= n`
    (the card's work grows at most in proportion, the host's launching not at all), from below
    where `tokens <= n`. True where a bound from above stays within `HOST_BOUND` (host-bound:
    graphs pay), False where one from below exceeds it, None where neither or both.

    A forward-only (validation) signature is never judged host-bound from fewer tokens: its
    timings stall (`EVAL_PROBES`) and each capture adds buffers to the training peak, so only
    a measured one or one with at least its tokens decides it. (A 0.5B AlpacaEval trial that
    judged its longer validation lengths from one probe recorded a training peak of 5.50 GiB
    against 4.79 GiB the session before with the same captured training lengths; not A/B'd
    in one call, session 25.)"""
    tokens, kind = _tokens_and_kind(signature)
    host = card = False
    for other, ratio in ratios.items():
        n, other_kind = _tokens_and_kind(other)
        if other_kind == kind:
            scale = tokens / n
            training = signature[0]
            host |= (training or scale <= 1) and ratio * max(1.0, scale) <= HOST_BOUND
            card |= ratio * min(1.0, scale) > HOST_BOUND
    return None if host == card else host


def _tokens_and_kind(signature: tuple) -> tuple[int, tuple]:
    gradients, shape, *rest = signature
    return math.prod(shape[:-1]), (gradients, shape[-1], *rest[:-1])  # rest[-1]: other shapes


class GraphedLayer:
    """Called instead of the decoder layer (`nn.Module._compiled_call_impl`, as
    torch.compile's regional compilation hooks in): training with gradients goes through
    `Checkpoint`, on graphs where the call can be keyed; evaluation without gradients
    replays a `ForwardGraph` where it can be keyed; anything else runs the layer."""

    def __init__(self, layer, shared: GraphSet | None, keep: bool = False):
        self.layer, self.shared, self.keep = layer, shared, keep  # keep: `_recompute_grads`
        self.params = [p for p in layer.parameters() if p.requires_grad]
        self.dropouts = [m for m in layer.modules() if isinstance(m, torch.nn.Dropout)]
        self.graphs: dict = {}  # training: signature -> Graphs
        self.forward_graphs: dict = {}  # evaluation: signature -> ForwardGraph

    def uninstall(self) -> None:
        """Checkpointing back as it was, the graphs dropped."""
        self.layer.gradient_checkpointing = True
        self.graphs.clear()
        self.forward_graphs.clear()

    def __call__(self, *args, **kwargs):
        layer = self.layer
        if not args:
            return layer._call_impl(*args, **kwargs)
        hidden = args[0]
        if not torch.is_grad_enabled() and not layer.training and self.shared is not None:
            return self._evaluate(args, kwargs)
        if not (layer.training and torch.is_grad_enabled()):
            return layer._call_impl(*args, **kwargs)
        if not (self.params or hidden.requires_grad):  # no gradient through it: no checkpoint
            return layer._call_impl(*args, **kwargs)
        call = _Call(layer, args, kwargs)
        key = self._key(call)
        graphs = self._graph(call, key, self.graphs, gradients=True)
        if graphs is not None:
            return Checkpoint.apply(Replay(graphs, call.sources), hidden, *self.params)
        runner = Eager(call.run, self.params, call.autocast, self.keep)
        return self._eager(
            key, True, hidden, lambda: Checkpoint.apply(runner, hidden, *self.params)
        )

    def _evaluate(self, args, kwargs):
        """A forward-only graph where the call can be keyed and pays, else the layer as it is."""
        call = _Call(self.layer, args, kwargs)
        key = self._key(call)
        graph = self._graph(call, key, self.forward_graphs, gradients=False)
        if graph is None:
            return self._eager(
                key, False, call.hidden, lambda: self.layer._call_impl(*args, **kwargs)
            )
        return graph(call.sources, call.hidden)

    def _eager(self, key, gradients: bool, hidden: torch.Tensor, run):
        """`run()` eagerly (counted), probed while its signature's worth is not known."""
        if self.shared is None:
            return run()
        self.shared.stats["eager_calls"] += 1
        if key is None:
            return run()
        return self.shared.probed(self, (gradients, *key[1:]), hidden, run)

    def _graph(self, call: _Call, key, table: dict, gradients: bool):
        """The call's `Graphs` (training) or `ForwardGraph` from `table`, captured now for a
        new signature measured to pay; None where the call cannot be keyed, its signature is
        not measured yet or does not pay, a packed training length is not expected again
        (`GraphSet.again`), or `MAX_SHAPES` are held."""
        if key is None:
            return None
        found = table.get(key)
        buffers = (gradients, *key[1:])  # the dropout switches (key[0]) change no buffer
        shared = self.shared
        if not gradients:
            shared.this_pass[buffers] += 1
        if (
            found is None
            and len(table) < MAX_SHAPES
            and (PROBE_AT == 0 or shared.judge(buffers))
            and shared.again(call.hidden, buffers)
        ):
            statics = shared.statics.get(buffers)
            if statics is None:
                statics = shared.statics[buffers] = Statics(call.sources, call.hidden, gradients)
            statics.fill(call.sources, call.hidden)
            run, warm = call.on(statics), (gradients, key) in shared.warm
            started = time.perf_counter()
            if gradients:
                found = Graphs(run, self.params, call.autocast, statics, shared, warm, self.keep)
            else:
                found = ForwardGraph(run, call.autocast, statics, shared, warm)
            seconds = time.perf_counter() - started
            shared.stats["capture_s"] += seconds
            shared.stats["training" if gradients else "evaluation"] += 1
            table[key] = found
            tokens = _packed_length(call.hidden, gradients)
            if tokens is not None:  # a packed training length: priced for `shapes.Plan`
                spent = shared.captures.setdefault(tokens, [0.0, 0])
                spent[0] += seconds
                spent[1] += 1
                # the timer by its id: a reference would close a cycle (set -> layer -> set)
                # that only the collector frees, at any moment, a capture's included
                shared.timer = shared.timer or id(self)
                if shared.timer == id(self) and tokens not in shared.timed:
                    found.samples = []
                    shared.timed[tokens] = found
            shared.warm.add((gradients, key))
        return found

    def _key(self, call: _Call):
        """Everything a capture bakes in: shapes, dtypes, flags, the dropout switches."""
        hidden = call.hidden
        if self.shared is None or hidden.device.type != "cuda":
            return None
        parts = []
        for leaf in call.leaves:
            if isinstance(leaf, torch.Tensor):
                parts.append((tuple(leaf.shape), leaf.dtype, leaf.device))
            elif leaf is None or isinstance(leaf, (bool, int, float, str)):
                parts.append(leaf)
            else:
                return None  # a cache or another object: not replayable
        dropouts = tuple(m.training for m in self.dropouts)
        return (
            dropouts,
            tuple(hidden.shape),
            hidden.dtype,
            hidden.requires_grad,
            call.autocast,
            str(call.spec),
            tuple(parts),
        )


class _Call:
    """One call of a decoder layer taken apart: the hidden states, the other arguments as
    leaves (their tensors are what a graph copies in), the autocast it runs under, and `run`,
    the layer on new hidden states with these (or static copies of these) tensors."""

    def __init__(self, layer, args: tuple, kwargs: dict):
        self.layer, self.hidden = layer, args[0]
        self.leaves, self.spec = tree_flatten((args[1:], kwargs))
        self.sources = [x for x in self.leaves if isinstance(x, torch.Tensor)]
        device = self.hidden.device.type
        enabled = torch.is_autocast_enabled(device)
        self.autocast = torch.get_autocast_dtype(device) if enabled else None

    def run(self, x, tensors: list | None = None):
        it = iter(self.sources if tensors is None else tensors)
        filled = [next(it) if isinstance(v, torch.Tensor) else v for v in self.leaves]
        rest, kw = tree_unflatten(filled, self.spec)
        return self.layer._call_impl(x, *rest, **kw)  # a decoder layer returns one tensor

    def on(self, statics: Statics):
        """`run` on the signature's static copies of the other tensors (what a graph bakes in)."""
        return lambda x: self.run(x, statics.buffers)


def install(layers: list, graphs: bool, dequantize_once: bool = False) -> int:
    """Route the checkpointed decoder `layers` through `GraphedLayer`: on CUDA graphs when
    `graphs`, else the same checkpoint eagerly. Their own checkpointing goes off (this is it).
    `dequantize_once`: each recomputation keeps its 4-bit weights dequantized for the backward.
    Returns how many layers. `speed.decompile_layers` takes them out again."""
    shared = GraphSet() if graphs and torch.cuda.is_available() else None
    count = 0
    for layer in layers:
        if not getattr(layer, "gradient_checkpointing", False):
            continue
        layer.gradient_checkpointing = False
        layer._compiled_call_impl = GraphedLayer(layer, shared, dequantize_once)
        count += 1
    if shared is not None:
        shared.layers = count
    return count


def stats(model) -> dict:
    """The graphs' counts (`GraphSet.stats`) of `model`; empty without graphs."""
    shared = graph_set(model)
    if shared is None:
        return {}
    counts = shared.stats
    return dict(
        counts, capture_s=round(counts["capture_s"], 3), warm_up_s=round(counts["warm_up_s"], 3)
    )


def graph_set(model) -> GraphSet | None:
    """The `GraphSet` `model`'s graphed layers share; None without graphs."""
    for m in model.modules():
        impl = getattr(m, "_compiled_call_impl", None)
        if isinstance(impl, GraphedLayer) and impl.shared is not None:
            return impl.shared
    return None


def captured(model) -> bool:
    """Whether any graph of `model` has been captured (it holds its tensors' addresses)."""
    counts = stats(model)
    return bool(counts.get("training") or counts.get("evaluation"))


def installed(model) -> bool:
    """Whether any layer of `model` runs through `GraphedLayer` on CUDA graphs."""
    return any(
        isinstance(m._compiled_call_impl, GraphedLayer) and m._compiled_call_impl.shared
        for m in model.modules()
    )
