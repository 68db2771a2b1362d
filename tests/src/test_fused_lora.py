"""One autograd node per LoRA layer (src/fused_lora.py): the same numbers as PEFT's layer."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from src import fused_lora, models


class Tiny(torch.nn.Module):
    def __init__(self, bias: bool, dtype=torch.float64):
        super().__init__()
        self.proj = torch.nn.Linear(6, 5, bias=bias, dtype=dtype)

    def forward(self, x):
        return self.proj(x)


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("bias", [False, True])
def test_backward_is_the_derivative_of_forward(p, bias):
    """torch.autograd.gradcheck in float64, dropout included (its mask fixed by the seed)."""
    torch.manual_seed(0)
    base = Tiny(bias).proj.requires_grad_(False)
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    a = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)

    def f(x, a, b):
        torch.manual_seed(1)
        return fused_lora.LoRAFunction.apply(x, base, a, b, 0.5, p)

    assert torch.autograd.gradcheck(f, (x, a, b))


def _peft(bias: bool, dropout: float = 0.0):
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["proj"])
    model = get_peft_model(Tiny(bias, torch.float32), config)
    torch.nn.init.normal_(model.base_model.model.proj.lora_B["default"].weight)
    return model


def test_fused_layer_gives_peft_outputs_and_gradients():
    x = torch.randn(3, 7, 6)
    want_model, got_model = _peft(True), _peft(True)
    assert fused_lora.fuse_lora(got_model) == 1
    outs, grads = [], []
    for model in (want_model, got_model):
        y = model(x)
        y.square().sum().backward()
        outs.append(y)
        grads.append([p.grad for p in model.parameters() if p.requires_grad])
    torch.testing.assert_close(outs[1], outs[0])
    for got, want in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(got, want)
    with got_model.disable_adapter():  # PEFT's own path: the base layer alone
        torch.testing.assert_close(got_model(x), got_model.base_model.model.proj.base_layer(x))


def test_eval_mode_has_no_dropout():
    model = _peft(False, dropout=0.5)
    fused_lora.fuse_lora(model)
    model.eval()
    x = torch.randn(4, 6)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


def test_every_lora_layer_of_a_4bit_model_is_fused(tiny_model):
    model = models.plain_lora(str(tiny_model), 4, 8, 0.1, torch.float32)
    keys = set(model.state_dict())
    assert fused_lora.fuse_lora(model) == 2 * 7  # 7 linear layers in each of 2 decoder layers
    assert set(model.state_dict()) == keys  # the adapter saves as before


def test_under_autocast_the_lora_product_is_in_autocast_dtype_as_in_peft():
    x = torch.randn(3, 7, 6)
    want_model, got_model = _peft(False), _peft(False)
    fused_lora.fuse_lora(got_model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, got = want_model(x), got_model(x)
    assert got.dtype == want.dtype
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
