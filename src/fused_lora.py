"""One autograd node per LoRA layer: base matmul (4-bit weights dequantized on the fly, or a
16-bit weight), dropout, LoRA A and B, all in one `torch.autograd.Function`.

Why by hand: PEFT's LoRA layer over bitsandbytes runs as ~11 separate operations per
forward (dequantize, matmul, a defensive clone of the result, dropout, two casts of the
adapter weights, two matmuls, scale, add) and as many autograd nodes and again in the
backward and in every recomputation of a checkpointed layer. A 0.5B model is bound by
launching them (the profile in docs/bench/README.md: GPU idle 84 % of a step). No library
we can plug into PEFT fuses this (Unsloth does, but only inside its own model loader);
here the adapters stay PEFT's own modules, so saving, loading and merging are unchanged.

The numbers follow PEFT: the base matmul in the compute dtype, the LoRA product in the
autocast dtype when autocast is on (bf16 on the GPU), else in the adapter weights' dtype.
"""

from __future__ import annotations

import contextlib
import types

import torch

# > 0 while a checkpointed layer is recomputed for its backward with `dequantize_once`: its
# LoRA layers keep the dequantized weight from the recomputation for the backward. A plain
# counter: the recomputation's forward runs in the thread that entered `weights_kept`
_KEPT = [0]


@contextlib.contextmanager
def weights_kept(on: bool = True):
    """While on, a LoRA layer run for gradients keeps its dense base weight for its backward
    (one layer at a time: inside a checkpointed layer's recomputation) instead of
    dequantizing it again there."""
    _KEPT[0] += bool(on)
    try:
        yield
    finally:
        _KEPT[0] -= bool(on)


def quantized(base: torch.nn.Module) -> bool:
    """A bitsandbytes 4-bit weight (it carries its quantization state)."""
    return getattr(base.weight, "quant_state", None) is not None


def base_weight(base: torch.nn.Module) -> torch.Tensor:
    """The base layer's weight as a dense [out, in] tensor (dequantized when 4-bit; while
    generating, the copy src/generation.inference_weights dequantized once, the same values)."""
    dense = getattr(base, "inference_weight", None)
    if dense is not None:
        return dense
    if not quantized(base):
        return base.weight
    import bitsandbytes.functional as F

    return F.dequantize_4bit(base.weight.data, base.weight.quant_state)


class LoRAFunction(torch.autograd.Function):
    """y = x W^T + bias + scale * dropout(x) A^T B^T, with W frozen."""

    @staticmethod
    def forward(ctx, x, base, lora_a, lora_b, scale: float, p: float):
        weight = base_weight(base)
        x2 = x.reshape(-1, x.shape[-1])
        xb = x2.to(weight.dtype)
        bias = base.bias
        if bias is None:
            y = torch.mm(xb, weight.t())
        else:
            y = torch.addmm(bias.to(xb.dtype), xb, weight.t())
        if quantized(base):
            y = y.to(x.dtype)  # as bitsandbytes does: the output in the input's dtype
        keep = _KEPT[0] > 0 and ctx.needs_input_grad[0] and quantized(base)
        kept = weight if keep else None  # else freed before the LoRA product
        del weight
        device = x.device.type  # the LoRA product in autocast's dtype, as PEFT's layer
        autocast = torch.is_autocast_enabled(device)
        dtype = torch.get_autocast_dtype(device) if autocast else lora_a.dtype
        xl = x2.to(dtype)
        mask = None
        if p > 0:
            xl, mask = torch.native_dropout(xl, p, True)
        a, b = lora_a.to(dtype), lora_b.to(dtype)
        xa = torch.mm(xl, a.t())
        if y.dtype == dtype:
            y.addmm_(xa, b.t(), alpha=scale)
        else:
            y += (torch.mm(xa, b.t()) * scale).to(y.dtype)
        ctx.save_for_backward(xl, mask, xa, a, b, kept)
        ctx.base, ctx.scale, ctx.p, ctx.x_shape, ctx.x_dtype = base, scale, p, x.shape, x.dtype
        ctx.lora_dtypes = (lora_a.dtype, lora_b.dtype)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        xl, mask, xa, a, b, kept = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])
        dyl = dy2.to(a.dtype)
        dxa = torch.mm(dyl, b).mul_(ctx.scale)  # [tokens, r]
        da = db = dx = None
        if ctx.needs_input_grad[3]:
            db = torch.mm(dyl.t(), xa).mul_(ctx.scale).to(ctx.lora_dtypes[1])
        if ctx.needs_input_grad[2]:
            da = torch.mm(dxa.t(), xl).to(ctx.lora_dtypes[0])
        if ctx.needs_input_grad[0]:
            weight = base_weight(ctx.base) if kept is None else kept
            dx = torch.mm(dy2.to(weight.dtype), weight)
            del weight, kept
            dl = torch.mm(dxa, a)
            if mask is not None:
                dl = torch.ops.aten.native_dropout_backward(dl, mask, 1.0 / (1.0 - ctx.p))
            dx = dx.add_(dl.to(dx.dtype)).to(ctx.x_dtype).view(ctx.x_shape)
        return dx, None, da, db, None, None


def _forward(self, x, *args, **kwargs):
    """A PEFT LoRA layer's forward through LoRAFunction when it is the plain case (one
    active vanilla adapter, not merged, no extra arguments); PEFT's own forward otherwise."""
    names = self.active_adapters
    if args or kwargs or self.disable_adapters or self.merged or len(names) != 1:
        return type(self).forward(self, x, *args, **kwargs)
    name = names[0]
    if name not in self.lora_A or name in getattr(self, "lora_variant", {}):
        return type(self).forward(self, x, *args, **kwargs)
    dropout = self.lora_dropout[name]
    p = dropout.p if isinstance(dropout, torch.nn.Dropout) and dropout.training else 0.0
    weight_a, weight_b = self.lora_A[name].weight, self.lora_B[name].weight
    return LoRAFunction.apply(x, self.base_layer, weight_a, weight_b, self.scaling[name], p)


def is_fused(module: torch.nn.Module) -> bool:
    """Whether `fuse_lora` routed this LoRA layer's forward through `LoRAFunction`."""
    forward = module.__dict__.get("forward")
    return getattr(forward, "__func__", None) is _forward


def fuse_lora(model) -> int:
    """Route every PEFT LoRA layer over a plain or 4-bit linear layer through LoRAFunction;
    returns how many. The modules stay PEFT's (state dict, saving, merging unchanged)."""
    from peft.tuners.lora import Linear as LoraLinear

    try:
        from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit
    except ImportError:  # bitsandbytes missing: 16-bit layers only
        LoraLinear4bit = LoraLinear
    count = 0
    for module in model.modules():
        if type(module) not in (LoraLinear, LoraLinear4bit):
            continue
        if any(module.use_dora.values()) or getattr(module, "fan_in_fan_out", False):
            continue
        module.forward = types.MethodType(_forward, module)
        count += 1
    return count
