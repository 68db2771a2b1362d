"""What makes a trial faster than the plain QLoRA recipe, each piece on its own switch.

- no fp32 upcast: PEFT's `prepare_model_for_kbit_training` casts every non-quantized weight
  (embeddings, lm_head, norms) to fp32, which makes the largest matmul of a small model (the
  logits) and every norm run in fp32. `freeze_for_lora` does the rest of what it does.
- fused kernels (Liger: RMSNorm, SwiGLU, RoPE, fused linear cross-entropy, which never builds
  the full-vocabulary logits) on CUDA with Triton; the CPU keeps the eager modules.
- selective activation checkpointing: recompute only a share of the decoder layers.
- padding-free batches: variable-length examples are concatenated with restarting position ids
  (transformers turns those into a block-diagonal causal mask), so no padding is computed and
  attention never crosses examples. A batch whose examples all have one length is stacked
  instead: it has no padding, and the unmasked causal kernel is faster than a masked one.
- logits only where they are scored: the prompt tokens' labels are masked, so the vocabulary
  projection and the loss run on the positions followed by a labelled token alone
  (`labelled_logits`, through transformers' `logits_to_keep`).
- an optimizer step that does not wait for the card after every parameter
  (`without_parameter_waits`, bitsandbytes' optimizers) and updates each parameter group
  with one kernel (`grouped_updates`).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import inspect
import math
import sys

import torch
from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from src.data import IGNORE


def liger_available() -> bool:
    """Liger's kernels are Triton kernels: CUDA and an importable triton + liger_kernel."""
    return (
        torch.cuda.is_available()
        and importlib.util.find_spec("triton") is not None
        and importlib.util.find_spec("liger_kernel") is not None
    )


def preload() -> None:
    """Import Liger's kernels where they run (its modules and Triton: ~13 % of a 0.5B trial's
    set-up, py-spy), so a spare trial process pays for it before it gets its trial. Nothing
    touches the GPU: no CUDA context is made."""
    if liger_available():
        import liger_kernel.transformers.monkey_patch  # noqa: F401


# CUDA's context flags (cuda.h CUctx_flags): how a thread waiting for the card behaves
CUDA_WAITS = {"auto": 0, "spin": 1, "yield": 2, "block": 4}


def cuda_waits(mode: str | None) -> bool:
    """How this process's threads wait for the GPU (`SWEEP_CUDA_WAIT`, set by the sweep for
    trials that share the host): "block" sleeps until the card is done, "spin" keeps polling
    a core, "auto" (CUDA's default) spins while the process has fewer CUDA contexts than the
    host has cores, i.e. always for a trial: packed trials each spin a core whenever they
    wait. On the H200, 16 packed 0.5B trials asleep used 59 % of the 16 host cores instead of
    88 %, at the same trials/hour (the card bounds them; docs/bench/README.md, session 20).
    Must run before the CUDA context exists; returns whether the flags were set. By hand:
    torch sets no context flags and has no call for them (pytorch/pytorch#28224), so the
    driver's primary-context call goes through ctypes."""
    flags = CUDA_WAITS.get(mode or "")
    if flags is None:
        return False
    import ctypes

    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:  # no NVIDIA driver: nothing waits for a GPU
        return False
    count = ctypes.c_int()
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return False
    set_flags = getattr(cuda, "cuDevicePrimaryCtxSetFlags_v2", None)
    set_flags = set_flags or cuda.cuDevicePrimaryCtxSetFlags
    done = True
    for index in range(count.value):
        device = ctypes.c_int()
        done &= cuda.cuDeviceGet(ctypes.byref(device), index) == 0
        done &= set_flags(device, flags) == 0
    return bool(count.value) and done


def fuse_kernels(model, kernels: str, compiled: bool = False) -> list[str]:
    """Swap in Liger's kernels on `model` (before PEFT wraps it); returns what was applied.

    `kernels`: "auto" (Liger where it runs, else nothing) or "none". An architecture Liger
    does not know keeps its own modules. With `compiled` decoder layers only the fused linear
    cross-entropy (outside the layers) is Liger's: torch.compile fuses the norms, SwiGLU and
    RoPE itself, and fails to trace Liger's Triton kernels (docs/bench/README.md).
    """
    if kernels == "none" or not liger_available():
        return []
    from liger_kernel.transformers.monkey_patch import (
        MODEL_TYPE_TO_APPLY_LIGER_FN,
        _apply_liger_kernel_to_instance,
    )

    if model.config.model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        return []
    layers = not compiled
    _apply_liger_kernel_to_instance(
        model=model, rope=layers, rms_norm=layers, swiglu=layers, fused_linear_cross_entropy=True
    )
    return (["rope", "rms_norm", "swiglu"] if layers else []) + ["fused_linear_cross_entropy"]


def attention_backends(cudnn: bool) -> None:
    """Whether SDPA may pick cuDNN's attention kernel (CUDA). cuDNN builds an execution plan
    for every new input shape, hundreds of milliseconds of host time each (pytorch/torchtune
    #1652); a trial's batches (padding-free, or padded to the longest example) change shape
    nearly every step, so each step paid one: 23 % of a 0.5B SST-2 trial's training time in
    its forward passes, 8 % in its validation (py-spy, docs/bench/README.md). Flash and
    memory-efficient attention have no per-shape set-up."""
    if torch.cuda.is_available():
        torch.backends.cuda.enable_cudnn_sdp(cudnn)


def freeze_for_lora(model, gradient_checkpointing: bool) -> None:
    """`prepare_model_for_kbit_training` without its fp32 upcast: freeze the base, and give
    checkpointed layers an input that requires grad (the frozen embeddings' output does not)."""
    for param in model.parameters():
        param.requires_grad_(False)
    model.config.use_cache = False
    if gradient_checkpointing:
        checkpointing(model)
        model.enable_input_require_grads()


def checkpointing(model) -> None:
    """Non-reentrant activation checkpointing on every decoder layer (newer transformers name
    it activation_checkpointing_enable, older ones gradient_checkpointing_enable)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def decoder_layers(model) -> list:
    return [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]


def compile_layers(model, enabled: bool) -> int:
    """Regional torch.compile: each decoder layer on its own (one compilation serves them all,
    the layers being alike). Returns the number of layers compiled.

    What it buys is launch overhead: a small model's step is bound by the host launching
    thousands of small kernels (docs/bench/README.md); the compiled layer runs its forward,
    recomputation and backward as a few fused kernels each. Checkpointing still applies
    around each compiled layer (its recomputation replays the same dropout masks: the RNG
    state is restored as for an eager layer; tests/src/test_speed.py checks the gradients)."""
    if not enabled:
        return 0
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile()
    return len(layers)


def decompile_layers(model) -> None:
    """Back to the eager layers (for generation, whose growing KV cache would recompile):
    compiled ones, or graphed ones (src/cuda_graphs.py, which get their checkpointing back
    and free their graphs)."""
    for layer in decoder_layers(model):
        if hasattr(layer._compiled_call_impl, "uninstall"):
            layer._compiled_call_impl.uninstall()
        layer._compiled_call_impl = None  # what nn.Module.compile set


def checkpoint_share(model, fraction: float) -> int:
    """Keep activation checkpointing on only the first `fraction` of the decoder layers (the
    rest keep their activations: faster, more memory). Returns how many layers recompute."""
    layers = [m for m in decoder_layers(model) if hasattr(m, "gradient_checkpointing")]
    keep = round(fraction * len(layers))
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = layer.gradient_checkpointing and i < keep
    return sum(bool(layer.gradient_checkpointing) for layer in layers)


def without_parameter_waits(optimizer) -> bool:
    """bitsandbytes' optimizers (0.50) call `torch.cuda.synchronize()` after every parameter's
    update (`Optimizer8bit.step`, `sync_gpu(p)`): ~400 waits a step for a 7B model's LoRA
    tensors, each leaving the card idle while the host prepares the next launch (1,574 device
    syncs in 4 profiled 7B SQuAD steps, docs/bench/README.md), and one more at the end of a
    step where states are paged. Their update kernels and the paged states' prefetches
    (`cudaMemPrefetchAsync` on stream 0, the legacy default stream torch's default stream is)
    go where the backward that made the gradients ran, so stream order already keeps every
    update after its gradient and before the next forward. The last wait ("all paged
    operations are asynchronous") would matter only to a host reading the paged states, and
    nothing does during training: the states are managed memory that only kernels and the
    driver's page migrations touch, and saving copies through the stream. That wait made the
    host idle at the end of every step and the card idle at the start of the next one while
    the host ran the Trainer's bookkeeping, collated the batch and launched the forward
    (docs/bench/README.md, session 22). This runs the library's own step with every wait left
    out. The per-parameter waits are what an open upstream change removes (bitsandbytes PR
    #2050, non-paged states); until a release has it, this is the one place that does.
    Returns whether `optimizer` is one of bitsandbytes' (else it is left as it is)."""
    try:
        from bitsandbytes.optim import optimizer as bnb_optimizer
    except ImportError:
        return False
    if not isinstance(optimizer, bnb_optimizer.Optimizer8bit) or not hasattr(
        bnb_optimizer, "sync_gpu"
    ):
        return False
    library_step = optimizer.step

    @functools.wraps(library_step)
    def step(*args, **kwargs):
        wait = bnb_optimizer.sync_gpu
        bnb_optimizer.sync_gpu = _no_wait
        try:
            return library_step(*args, **kwargs)
        finally:
            bnb_optimizer.sync_gpu = wait

    optimizer.step = step
    return True


def _no_wait(tensor) -> None:
    """What `without_parameter_waits` puts in place of bitsandbytes' per-parameter sync."""


BLOCK = 256  # bitsandbytes' 8-bit states are quantized in blocks of this many elements


def grouped_updates(optimizer) -> int:
    """bitsandbytes' step as one update kernel per parameter group and dtype instead of one
    per tensor, where that gives the same numbers: the group's tensors become views of one
    flat parameter (their `Parameter` objects stay, so the model, its gradients and the saved
    adapter see no change) and each step copies their gradients into the flat one's. A 7B
    model's LoRA has 392 tensors: 392 launches from Python a step (13 ms of host, session
    22's profile), so many small kernels that the card's launch queue filled ("Command Buffer
    Full", 16 ms a step) and the host, blocked there, reached the next step's batch and
    forward late. By hand: bitsandbytes has no multi-tensor step, and torch's fused AdamW is
    another optimizer; flat parameter buffers are what DeepSpeed and Megatron do for theirs.

    The same numbers: 32-bit states update each element on its own; 8-bit states quantize in
    blocks of `BLOCK` from each tensor's start, so only tensors whose size is a multiple of it
    and at least the optimizer's `min_8bit_size` (smaller ones keep 32-bit states) join a
    group (a LoRA tensor of rank 8 or 16 on Qwen2.5 always does). Tensors with a per-parameter
    override (`GlobalOptimManager`) keep their own update. A member without a gradient takes
    zeros in its group (the library would skip it; a LoRA tensor always gets one). Call it
    before the first step, and before anything records the parameters' addresses (CUDA
    graphs). Returns how many tensors were grouped (0: not one of bitsandbytes' optimizers,
    already stepped, or nothing to group)."""
    try:
        from bitsandbytes.optim import optimizer as bnb_optimizer
    except ImportError:
        return 0
    if not isinstance(optimizer, bnb_optimizer.Optimizer8bit) or optimizer.state:
        return 0
    manager = optimizer.mng
    if manager.index2config:  # overrides by position: regrouping would move them
        return 0
    overridden = set(manager.pid2config) | {
        id(getattr(module, attr)) for module, attr, _ in manager.module_weight_config_triple
    }
    eight_bit = optimizer.args.optim_bits == 8
    groups = []  # (flat parameter, its members)
    for group in optimizer.param_groups:
        kinds: dict = {}
        for p in group["params"]:
            n = p.numel()
            if id(p) in overridden or not p.is_contiguous():
                continue
            if eight_bit and (n % BLOCK or n < optimizer.args.min_8bit_size):
                continue
            kinds.setdefault((p.device, p.dtype), []).append(p)
        flats, joined = [], set()
        for members in kinds.values():
            if len(members) < 2:
                continue
            with torch.no_grad():
                flat = torch.nn.Parameter(torch.cat([p.detach().reshape(-1) for p in members]))
            offset = 0
            for p in members:
                p.data = flat.data[offset : offset + p.numel()].view_as(p)
                offset += p.numel()
            joined |= {id(p) for p in members}
            flats.append(flat)
            groups.append((flat, members))
        if flats:
            group["params"] = [p for p in group["params"] if id(p) not in joined] + flats
    if not groups:
        return 0
    library_step = optimizer.step

    @functools.wraps(library_step)
    def step(*args, **kwargs):
        for flat, members in groups:
            grads = [p.grad for p in members]
            if all(g is None for g in grads):
                flat.grad = None
                continue
            with torch.no_grad():
                flat.grad = torch.cat(
                    [(torch.zeros_like(p) if g is None else g).reshape(-1)
                     for p, g in zip(members, grads, strict=True)]
                )  # fmt: skip
        try:
            return library_step(*args, **kwargs)
        finally:
            for flat, _ in groups:
                flat.grad = None

    optimizer.step = step
    return sum(len(members) for _, members in groups)


BOUNDARIES = "packed_cu_seqlens"  # the model input that carries a packed row's boundaries
DEVICES = {"cuda"}  # where torch's varlen attention runs
SLOTS = 16  # boundaries padded to a multiple of this (empty sequences): few graph signatures


@functools.cache
def _varlen():
    """torch's variable-length flash attention (torch >= 2.10) and how to ask for causal
    attention and grouped key/value heads in this version; None where it is missing."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    causal = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    return varlen_attn, causal, "enable_gqa" in params, "scale" in params


def packed_attention_available() -> bool:
    return torch.cuda.is_available() and _varlen() is not None


def install_packed_attention() -> bool:
    """Route transformers' "sdpa" attention through `packed_attention` in this process (a
    trial process: every model in it). Calls without packed boundaries go to SDPA as before.
    Returns whether it is in place: CUDA, torch's varlen attention, and that kernel agreeing
    with SDPA here (`varlen_check`; where it does not, the trial says so and keeps SDPA)."""
    if not packed_attention_available():
        return False
    try:
        gap = varlen_check("cuda")
        why = f"differs from SDPA by {gap:.3f} (relative, output or gradients)"
    except (RuntimeError, ValueError) as err:  # e.g. a kernel this GPU does not have
        gap, why = math.inf, f"failed: {err}".splitlines()[0]
    if gap > CHECK_TOLERANCE:
        print(f"packed_attention off: torch's varlen attention {why} here; SDPA kept",
              file=sys.stderr)  # fmt: skip
        return False
    register_packed_attention()
    return True


CHECK_TOLERANCE = 2e-2  # bf16: a right kernel lands near 4e-3


def per_sequence_attention(q, k, v, bounds: list[int]) -> torch.Tensor:
    """The reference: causal SDPA on each [start, end) of `bounds` alone, `[tokens, heads,
    dim]` in and out (grouped key/value heads allowed), empty sequences skipped."""
    out = torch.zeros_like(q)
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        if end > start:
            part = torch.nn.functional.scaled_dot_product_attention(
                *(t[start:end].transpose(0, 1) for t in (q, k, v)),
                is_causal=True,
                enable_gqa=k.shape[1] != q.shape[1],
            )
            out[start:end] = part.transpose(0, 1)
    return out


@functools.cache
def varlen_check(device: str) -> float:
    """The largest relative difference of `packed_attention` (torch's varlen kernel as it is
    called here) from `per_sequence_attention`, output and gradients of q, k and v, on a
    small bf16 case with grouped heads and empty slots. Run once per process before packed
    attention is used: the kernel's causal switch moved between torch versions (`is_causal`,
    then `window_size`), and a backward that lost it would train wrong adapters under a
    right-looking loss (the forward alone cannot tell)."""
    gen = torch.Generator().manual_seed(5)
    n, heads, kv, dim = 320, 4, 2, 64
    bounds = [0, 75, 76, 203, 256, n] + [n] * (SLOTS - 6)
    base = [torch.randn(n, h, dim, generator=gen) for h in (heads, kv, kv, heads)]
    base = [t.to(device, torch.bfloat16) for t in base]
    cu = torch.tensor(bounds, dtype=torch.int32, device=device)
    module = type("Layer", (), {"training": True})()

    def packed(q, k, v):
        out, _ = packed_attention(
            module, *(t.transpose(0, 1)[None] for t in (q, k, v)), None, sdpa=None,
            **{BOUNDARIES: cu},
        )  # fmt: skip
        return out[0]

    results = []
    for attention in (packed, lambda q, k, v: per_sequence_attention(q, k, v, bounds)):
        q, k, v = (t.clone().requires_grad_() for t in base[:3])
        out = attention(q, k, v)
        out.backward(base[3])
        results.append([t.float() for t in (out, q.grad, k.grad, v.grad)])
    return max(
        float((a - b).norm() / b.norm().clamp_min(1e-12)) for a, b in zip(*results, strict=True)
    )


def register_packed_attention() -> None:
    """transformers' attention registry is the place it offers for this (AttentionInterface);
    the SDPA function it held stays the fallback. Registered as "sdpa" (every model of the
    process) and as `MASKLESS` (see `maskless`)."""
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    if not getattr(sdpa, "packed", False):
        attention = functools.partial(packed_attention, sdpa=sdpa)
        attention.packed = True
        AttentionInterface.register("sdpa", attention)
        AttentionInterface.register(MASKLESS, attention)


MASKLESS = "sdpa_packed"  # packed attention under a name that has no mask function


@contextlib.contextmanager
def maskless(model, packed: bool):
    """Run `model`'s forward on a packed row without the mask transformers would build for it.

    Given restarting position ids and no mask, transformers' masking (create_causal_mask)
    finds the packed sequences, builds the block-diagonal causal mask on the card, and reads
    back whether the row was packed at all (`find_packed_sequence_indices`, a `.all()`): the
    host waited there for the previous step's last kernels at the start of every forward,
    and then the card idled while the host built the mask and launched the forward. Packed
    attention never reads that mask (the row's boundaries are in the batch). An attention
    implementation with no mask function registered is the case transformers' masking skips
    ("custom attention without equivalent mask creation: we don't need a mask"), so the
    forward runs under `MASKLESS` (the same function as "sdpa" here) and the implementation
    goes back afterwards: validation accuracy and generation use the same model with padded
    batches and masks. A recomputed (checkpointed) layer gets the mask its forward got (none)
    and reaches packed attention through "sdpa". Nothing changes where `packed` is false, the
    model does not run "sdpa", packed attention is not registered, or some layer could not
    run on the varlen kernel (attention dropout, sliding windows: they keep the mask)."""
    base = getattr(model, "module", model)  # DataParallel's wrapper (the Trainer's, n_gpu > 1)
    base = base.get_base_model() if hasattr(base, "get_base_model") else base
    config = getattr(base, "config", None)
    if not (
        packed
        and config is not None
        and config._attn_implementation == "sdpa"
        and MASKLESS in ALL_ATTENTION_FUNCTIONS
        and not getattr(config, "attention_dropout", 0.0)
        and "sliding_attention" not in (getattr(config, "layer_types", None) or ())
    ):
        yield
        return
    config._attn_implementation = MASKLESS
    try:
        yield
    finally:
        config._attn_implementation = "sdpa"


def packed_attention(
    module,
    query,
    key,
    value,
    attention_mask,
    dropout=0.0,
    scaling=None,
    sliding_window=None,
    *,
    sdpa,
    **kwargs,
):
    """Attention of one concatenated row (query `[1, heads, tokens, dim]`) as separate causal
    sequences, from the boundaries the collator put in the batch (`BOUNDARIES`, int32, its
    unused tail repeating the row's length); anything else, or what this torch cannot do
    (dropout, a sliding window, another scale), goes to `sdpa`. Returns `[1, tokens, heads,
    dim]` as transformers' attention functions do."""
    bounds = kwargs.get(BOUNDARIES)
    found = _varlen()
    usable = (
        bounds is not None
        and found is not None
        and query.shape[0] == 1
        and query.device.type in DEVICES
        and not (dropout and module.training)
        and sliding_window is None
    )
    if usable:
        varlen_attn, causal, gqa, has_scale = found
        default_scale = query.shape[-1] ** -0.5
        usable = has_scale or scaling is None or abs(scaling - default_scale) < 1e-9
    if not usable and bounds is not None and attention_mask is None:  # `maskless`: no mask
        raise ValueError(
            "a packed row reached an attention that torch's varlen kernel cannot run here "
            "(attention dropout, a sliding window or another scale) without a mask for SDPA"
        )
    if not usable:
        return sdpa(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            sliding_window=sliding_window,
            **kwargs,
        )
    q = query[0].transpose(0, 1).contiguous()  # [tokens, heads, dim]
    k = key[0].transpose(0, 1).contiguous()
    v = value[0].transpose(0, 1).contiguous()
    extra = dict(causal)
    if k.shape[1] != q.shape[1]:
        if gqa:
            extra["enable_gqa"] = True
        else:  # grouped heads as transformers' repeat_kv orders them
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    if has_scale and scaling is not None:
        extra["scale"] = scaling
    tokens = q.shape[0]  # an upper bound of every sequence's length: static for a graph
    out = varlen_attn(q, k, v, bounds, bounds, tokens, tokens, **extra)
    return out.unsqueeze(0), None


def boundaries(position_ids: torch.Tensor) -> torch.Tensor:
    """A concatenated row's sequence starts (where positions restart) and its end, int32,
    padded to a multiple of `SLOTS` by repeating the end (empty sequences)."""
    row = position_ids[0]
    starts = (row == 0).nonzero().flatten().tolist()
    ends = [*starts, len(row)]
    ends += [len(row)] * (-len(ends) % SLOTS)
    return torch.tensor(ends, dtype=torch.int32)


class PaddingFree:
    """Concatenate a batch of variable-length examples into one row with restarting position
    ids; a batch of equal lengths is stacked as is. Written here because transformers offers
    either collator but not the choice per batch (the causal kernel needs no mask).

    `bucket`: pad each batch on the right to one of a few lengths (`bucket_length`), for CUDA
    graphs, which replay fixed shapes; a packed training batch to `lengths.length(n)` where
    `lengths` is given (`shapes.Plan`: at least its bucket; not while `evaluating`). Causal
    attention keeps the real tokens from seeing the padding, whose labels are ignored;
    `padding` counts the tokens added."""

    def __init__(self, tokenizer, bucket: bool = False, packed: bool = False, lengths=None):
        self.flat = DataCollatorWithFlattening(return_position_ids=True)
        self.padded = DataCollatorForSeq2Seq(tokenizer, padding=True)
        self.bucket = bucket
        self.lengths = lengths
        self.evaluating = False
        self.packed = packed  # add each concatenated row's boundaries (packed attention)
        self.pad_id = tokenizer.pad_token_id or 0
        self.padding = 0

    def __call__(self, features: list[dict]) -> dict:
        if len({len(f["input_ids"]) for f in features}) == 1:
            batch = self.padded(features)  # equal lengths: nothing to pad
            if self.bucket:
                batch.pop("attention_mask", None)  # all ones: the causal kernel needs none
        else:
            batch = self.flat([{k: f[k] for k in ("input_ids", "labels")} for f in features])
        if self.bucket:
            batch = self._to_bucket(batch)
        if self.packed and "position_ids" in batch:
            batch[BOUNDARIES] = boundaries(batch["position_ids"])
        return batch

    def _to_bucket(self, batch: dict) -> dict:
        rows, n = batch["input_ids"].shape
        planned = self.lengths is not None and rows == 1 and not self.evaluating
        extra = (self.lengths.length(n) if planned else bucket_length(n)) - n
        if extra == 0:
            return batch
        fill = {"input_ids": self.pad_id, "labels": IGNORE}
        for name, tensor in batch.items():
            if name == "position_ids":  # the padding as one more sequence of its own
                tail = torch.arange(extra, dtype=tensor.dtype).expand(rows, extra)
            else:
                tail = torch.full((rows, extra), fill.get(name, 0), dtype=tensor.dtype)
            batch[name] = torch.cat([tensor, tail], dim=1)
        self.padding += rows * extra
        return batch


def bucket_length(n: int) -> int:
    """`n` rounded up to a multiple of an eighth of its power of two (at least 64): at most
    12.5 % padding, and a few lengths per doubling, so CUDA graphs get reused."""
    step = max(64, (1 << (n.bit_length() - 1)) // 8)
    return -(-n // step) * step


def collator(
    tokenizer,
    packing: bool,
    cuda: bool,
    bucket: bool = False,
    packed: bool = False,
    labelled: bool = False,
    fused: bool = False,
    unfused_share: float = 0.0,
    lengths=None,
):
    """The trial's batches: padding-free (`packing`) or padded; `labelled`: logits only at the
    positions that are scored (`labelled_logits`) in the validation loss, and in training
    too, where the model's training loss is `fused` (Liger's) only in batches scoring at most
    `unfused_share` of their positions (`LabelledLogits`); `lengths`: what packed training
    batches are padded to (`PaddingFree`)."""
    if packing:
        collate = PaddingFree(tokenizer, bucket, packed, lengths)
    else:
        collate = DataCollatorForSeq2Seq(
            tokenizer, padding=True, pad_to_multiple_of=8 if cuda else None
        )
    return LabelledLogits(collate, fused, unfused_share) if labelled else collate


def labelled_logits(batch: dict) -> dict:
    """Ask the model for logits only at the positions whose next token is labelled (in any
    row) and at the last one: `logits_to_keep`, which transformers' causal LMs (and Liger's
    fused loss) apply to the hidden states before the vocabulary projection. `labels` become
    the targets of the kept positions behind one IGNORE, so the causal-LM loss's own shift
    pairs each kept position with its target, and the last position (kept, never a target)
    gets the IGNORE that shift pads with; the Trainer counts the same scored tokens.

    The prompt's labels are masked (src/data.py), so this leaves out most positions of a
    SQuAD or SST-2 row: the projection onto the vocabulary is 20-27 % of a small model's
    training FLOPs, and its logits are the largest activation without fused kernels."""
    labels = batch["labels"]
    targets = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE)
    keep = (targets != IGNORE).any(dim=0)
    keep[-1] = True
    if keep.all():  # every position scored (pretraining-style rows): nothing to leave out
        return batch
    positions = keep.nonzero().flatten()
    lead = torch.full((labels.shape[0], 1), IGNORE, dtype=labels.dtype)
    batch["labels"] = torch.cat([lead, targets[:, positions[:-1]]], dim=1)
    batch["logits_to_keep"] = positions
    return batch


def keeps_logits(model) -> bool:
    """Whether the causal LM under `model` (PEFT's wrapper or not) takes `logits_to_keep`:
    transformers' own models do; a remote-code one may not, and then keeps every logit."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def fuses_loss(model) -> bool:
    """Whether the causal LM under `model` computes its training loss with Liger's fused
    linear cross-entropy (chunks of logits, never all of them at once)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    forward = getattr(base.forward, "__func__", base.forward)
    return getattr(forward, "__module__", "").startswith("liger_kernel")


class LabelledLogits:
    """A collator's batches with `labelled_logits` applied (`padding`: the inner count): in
    validation (`evaluating`, set by the trainer) and in training. Where the model's training
    loss is `fused` (Liger's linear cross-entropy, which never holds every position's logits),
    a training batch is cut only where it scores at most `unfused_share` of its positions,
    and then asks Liger's forward for the plain projection and transformers' loss on those
    positions (`skip_logits=False`, Liger's switch); other batches keep the fused loss over
    every position.

    Why per batch: the fused loss runs the projection over every position in chunks (30
    chunks at 1,900 tokens on the 7B shape: ~4 TFLOP a step, most of it on prompt positions
    that are never scored) and makes the host wait for the card three times a step (the
    count of scored tokens, and twice at the start of its backward; torch's sync debug mode,
    docs/bench/README.md, session 22). A SQuAD or SST-2 batch scores ~50 of ~1,900 positions:
    their logits are a few MiB. An AlpacaEval batch scores most of its answer-long rows:
    their logits would be the largest activation, which is what the fused loss is for.
    Measured before (session 14): the fused loss on the labelled positions alone made training
    slower (0.5B AlpacaEval 5,808 -> 4,577 tokens/s, 7B SQuAD 4,887 -> 4,591), while the
    validation loss, which materializes every logit (Liger fuses only in training), set the
    7B trial's peak: 16.87 -> 11.49 GiB. Without the fused loss (the CPU) both phases gained
    (docs/objectives.md)."""

    def __init__(self, collate, fused: bool = False, unfused_share: float = 0.0):
        self.collate = collate
        self.fused, self.unfused_share = fused, unfused_share
        self.evaluating = False

    @property
    def evaluating(self) -> bool:
        return self._evaluating

    @evaluating.setter
    def evaluating(self, value: bool) -> None:
        self._evaluating = value
        if hasattr(self.collate, "evaluating"):  # the padding plan: training batches only
            self.collate.evaluating = value

    @property
    def padding(self) -> int:
        return getattr(self.collate, "padding", 0)

    def __call__(self, features: list[dict]) -> dict:
        batch = self.collate(features)
        if self.evaluating or not self.fused:
            return labelled_logits(batch)
        cut = labelled_logits(dict(batch))
        kept = cut.get("logits_to_keep")
        if kept is None or len(kept) > self.unfused_share * batch["input_ids"].shape[-1]:
            return batch  # the fused loss over every position
        cut["skip_logits"] = False
        return cut
