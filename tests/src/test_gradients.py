"""The bitsandbytes AVX512-BF16 trap: LoRA gradients after an eval pass must stay exact.

Reference: a dense model whose linear weights are the dequantized 4-bit weights, with the same
LoRA weights. Both see a no-grad forward in eval mode first (what triggers the repacking),
then one training forward/backward on the same batch.
"""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from src.models import load_4bit_model


def _dense_copy(quantized, model_dir):
    dense = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    modules = dict(dense.named_modules())
    for name, module in quantized.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
            modules[name].weight.data.copy_(weight.float())
    return dense


def _lora(model):
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    for name, param in model.named_parameters():
        if "lora_B" in name:  # B starts at zero, which would leave A's gradient at zero
            torch.manual_seed(hash(name) % 2**31)
            param.data.normal_(0, 0.02)
    return model


def _grads_after_eval(model, batch):
    model.eval()
    with torch.no_grad():
        model(input_ids=batch)
    model.train()
    model(input_ids=batch, labels=batch).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _worst_relative_error(model_dir, unprotect: bool) -> float:
    quantized = load_4bit_model(str(model_dir), torch.float32)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in quantized.modules())
    dense = _dense_copy(quantized, model_dir)
    if unprotect:  # what bitsandbytes sets by itself on a CPU with AVX512-BF16
        for module in quantized.modules():
            if isinstance(module, bnb.nn.Linear4bit):
                module.support_avx512bf16_for_cpu = True
    batch = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    got = _grads_after_eval(_lora(quantized), batch)
    want = _grads_after_eval(_lora(dense), batch)
    assert got.keys() == want.keys() and len(got) > 0
    return max(((got[n] - want[n]).norm() / want[n].norm()).item() for n in want)


def test_lora_gradients_match_dense_model_after_eval(tiny_model):
    assert _worst_relative_error(tiny_model, unprotect=False) < 1e-3


def test_the_trap_is_real_without_protection(tiny_model):
    # what the fix prevents, in whichever form this CPU shows it: where bitsandbytes repacks
    # (AVX512-BF16) the later LoRA backward either gives wrong gradients or fails in
    # `matmul_4bit` on the repacked weight ("a view of a leaf Variable ... in-place"); the
    # comparison catches the first, the error is the second
    try:
        error = _worst_relative_error(tiny_model, unprotect=True)
    except RuntimeError as err:
        assert "in-place operation" in str(err)
        return
    assert error > 0.1


def test_every_4bit_layer_is_protected(tiny_model):
    model = load_4bit_model(str(tiny_model), torch.float32)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(m.support_avx512bf16_for_cpu is False for m in layers)


@pytest.mark.parametrize("dtype", ["auto", "float32"])
def test_compute_dtype_on_cpu_is_fp32(dtype):
    from src.models import compute_dtype

    if not torch.cuda.is_available():
        assert compute_dtype(dtype) == torch.float32
