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
"""

from __future__ import annotations

import importlib.util

import torch
from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

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


class PaddingFree:
    """Concatenate a batch of variable-length examples into one row with restarting position
    ids; a batch of equal lengths is stacked as is. Written here because transformers offers
    either collator but not the choice per batch (the causal kernel needs no mask).

    `bucket`: pad each batch on the right to one of a few lengths (`bucket_length`), for CUDA
    graphs, which replay fixed shapes. Causal attention keeps the real tokens from seeing the
    padding, whose labels are ignored; `padding` counts the tokens added."""

    def __init__(self, tokenizer, bucket: bool = False):
        self.flat = DataCollatorWithFlattening(return_position_ids=True)
        self.padded = DataCollatorForSeq2Seq(tokenizer, padding=True)
        self.bucket = bucket
        self.pad_id = tokenizer.pad_token_id or 0
        self.padding = 0

    def __call__(self, features: list[dict]) -> dict:
        if len({len(f["input_ids"]) for f in features}) == 1:
            batch = self.padded(features)  # equal lengths: nothing to pad
            if self.bucket:
                batch.pop("attention_mask", None)  # all ones: the causal kernel needs none
        else:
            batch = self.flat([{k: f[k] for k in ("input_ids", "labels")} for f in features])
        return self._to_bucket(batch) if self.bucket else batch

    def _to_bucket(self, batch: dict) -> dict:
        rows, n = batch["input_ids"].shape
        extra = bucket_length(n) - n
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


def collator(tokenizer, packing: bool, cuda: bool, bucket: bool = False):
    if packing:
        return PaddingFree(tokenizer, bucket)
    return DataCollatorForSeq2Seq(tokenizer, padding=True, pad_to_multiple_of=8 if cuda else None)
