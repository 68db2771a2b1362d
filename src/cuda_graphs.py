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

Shapes must repeat for graphs to pay: `speed.PaddingFree(bucket=True)` pads each batch to one
of a few lengths. A shape first seen is captured (the first layer to see it runs twice
eagerly on a side stream first, so lazy initialisation happens outside a capture); past
`MAX_SHAPES` per layer, or for an input it cannot key, the layer runs the same checkpoint
eagerly. Evaluation (no gradients) always runs the layers eagerly. Adapters only: with full
fine-tuning each graph would hold a copy of its layer's weight gradients (src/train_qlora.py).
"""

from __future__ import annotations

import contextlib

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

MAX_SHAPES = 16  # graphs kept per layer: each shape's pair holds its static buffers


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

    def __init__(self, run, params, autocast):
        self.run, self.params, self.autocast = run, params, autocast

    def forward(self, hidden):
        return self.run(hidden)

    def backward(self, hidden, grad):
        x = hidden.detach().requires_grad_()
        return _recompute_grads(self.run, x, self.params, grad, self.autocast)


def _recompute_grads(run, x, params, grad, autocast) -> tuple:
    """Run the layer again on the leaf `x` under the forward's autocast and return the
    gradients of `x` and of `params` (zeros for a parameter the output does not reach)."""
    with torch.enable_grad(), _autocast(x.device, autocast):
        grads = torch.autograd.grad(run(x), [x, *params], grad, allow_unused=True)
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


class Graphs:
    """One layer's captured forward and backward for one input signature. Inputs and outputs
    live in the signature's `Statics`, shared by all layers (their replays never overlap and
    each output is copied out at once); only the LoRA gradients are the layer's own."""

    def __init__(self, run, params, autocast, statics: Statics, shared: GraphSet, warm: bool):
        self.statics = statics
        device = statics.hidden.device
        if not warm:  # lazy initialisation (cuBLAS, Triton) outside captures, once per shape
            side = shared.side_stream
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    _recompute_grads(run, statics.hidden, params, statics.grad_out, autocast)
            torch.cuda.current_stream(device).wait_stream(side)
        self.forward_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(
            self.forward_graph, pool=shared.pool, capture_error_mode="thread_local"
        ):
            with torch.no_grad(), _autocast(device, autocast):
                statics.out.copy_(run(statics.hidden))
        self.backward_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(
            self.backward_graph, pool=shared.pool, capture_error_mode="thread_local"
        ):
            grad_in, self.grad_params = _recompute_grads(
                run, statics.hidden, params, statics.grad_out, autocast
            )
            statics.grad_in.copy_(grad_in)


class Replay:
    """One call's runner over a layer's graphs (the inputs copied into the static buffers
    first; the mask and rotary embeddings only when they are not the ones already there)."""

    def __init__(self, graphs: Graphs, sources: list):
        self.graphs, self.sources = graphs, sources

    def forward(self, hidden):
        statics = self.graphs.statics
        statics.fill(self.sources, hidden)
        self.graphs.forward_graph.replay()
        return statics.out.clone()

    def backward(self, hidden, grad):
        statics = self.graphs.statics
        statics.fill(self.sources, hidden)
        with torch.no_grad():
            statics.grad_out.copy_(grad)
        self.graphs.backward_graph.replay()
        return statics.grad_in.clone(), [t.clone() for t in self.graphs.grad_params]


class Statics:
    """The static buffers of one input signature, shared by all layers: the hidden states in
    and out, their gradients, and copies of the other tensor inputs (every layer gets the
    same mask and rotary embeddings: copied once per new source)."""

    def __init__(self, sources: list, hidden: torch.Tensor):
        self.buffers = [t.clone() for t in sources]
        self.current = list(sources)
        self.hidden = torch.empty_like(hidden).requires_grad_()  # a leaf, for input gradients
        self.out, self.grad_out, self.grad_in = (torch.zeros_like(hidden) for _ in range(3))

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
        self.statics: dict = {}
        self.warm: set = set()


class GraphedLayer:
    """Called instead of the decoder layer (`nn.Module._compiled_call_impl`, as
    torch.compile's regional compilation hooks in): training with gradients goes through
    `Checkpoint`, on graphs where the call can be keyed; anything else runs the layer."""

    def __init__(self, layer, shared: GraphSet | None):
        self.layer, self.shared = layer, shared
        self.params = [p for p in layer.parameters() if p.requires_grad]
        self.dropouts = [m for m in layer.modules() if isinstance(m, torch.nn.Dropout)]
        self.graphs: dict = {}

    def uninstall(self) -> None:
        """Checkpointing back as it was, the graphs dropped."""
        self.layer.gradient_checkpointing = True
        self.graphs.clear()

    def __call__(self, *args, **kwargs):
        layer = self.layer
        if not (args and layer.training and torch.is_grad_enabled()):
            return layer._call_impl(*args, **kwargs)
        hidden = args[0]
        if not (self.params or hidden.requires_grad):  # no gradient through it: no checkpoint
            return layer._call_impl(*args, **kwargs)
        leaves, spec = tree_flatten((args[1:], kwargs))
        sources = [x for x in leaves if isinstance(x, torch.Tensor)]
        autocast = (
            torch.get_autocast_dtype(hidden.device.type)
            if torch.is_autocast_enabled(hidden.device.type)
            else None
        )

        def run(x, tensors=sources):
            it = iter(tensors)
            filled = [next(it) if isinstance(v, torch.Tensor) else v for v in leaves]
            rest, kw = tree_unflatten(filled, spec)
            return layer._call_impl(x, *rest, **kw)  # a decoder layer returns one tensor

        runner = self._replay(run, hidden, leaves, spec, sources, autocast)
        if runner is None:
            runner = Eager(run, self.params, autocast)
        return Checkpoint.apply(runner, hidden, *self.params)

    def _replay(self, run, hidden, leaves, spec, sources, autocast) -> Replay | None:
        key = self._key(hidden, leaves, spec, autocast)
        if key is None:
            return None
        graphs = self.graphs.get(key)
        if graphs is None:
            if len(self.graphs) >= MAX_SHAPES:
                return None
            shared = self.shared
            statics = shared.statics.get(key[1:])
            if statics is None:
                statics = shared.statics[key[1:]] = Statics(sources, hidden)
            statics.fill(sources, hidden)

            def run_static(x, tensors=statics.buffers):
                return run(x, tensors)

            graphs = self.graphs[key] = Graphs(
                run_static, self.params, autocast, statics, shared, key in shared.warm
            )
            shared.warm.add(key)
        return Replay(graphs, sources)

    def _key(self, hidden, leaves, spec, autocast):
        """Everything a capture bakes in: shapes, dtypes, flags, the dropout switches."""
        if self.shared is None or hidden.device.type != "cuda":
            return None
        parts = []
        for leaf in leaves:
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
            autocast,
            str(spec),
            tuple(parts),
        )


def install(layers: list, graphs: bool) -> int:
    """Route the checkpointed decoder `layers` through `GraphedLayer`: on CUDA graphs when
    `graphs`, else the same checkpoint eagerly. Their own checkpointing goes off (this is it).
    Returns how many layers. `speed.decompile_layers` takes them out again."""
    shared = GraphSet() if graphs and torch.cuda.is_available() else None
    count = 0
    for layer in layers:
        if not getattr(layer, "gradient_checkpointing", False):
            continue
        layer.gradient_checkpointing = False
        layer._compiled_call_impl = GraphedLayer(layer, shared)
        count += 1
    return count


def installed(model) -> bool:
    """Whether any layer of `model` runs through `GraphedLayer` on CUDA graphs."""
    return any(
        isinstance(m._compiled_call_impl, GraphedLayer) and m._compiled_call_impl.shared
        for m in model.modules()
    )
