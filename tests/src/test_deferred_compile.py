"""bitsandbytes imported without Inductor's import cost (src/deferred_compile.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from src.deferred_compile import compile_on_first_call
from tests.conftest import ROOT

INDUCTOR = "torch._inductor.compile_fx"


def test_a_compile_inside_is_made_at_the_first_call_once_with_its_options(monkeypatch):
    made = []

    def fake_compile(fn, **options):
        made.append(options)
        return lambda x: fn(x) + 1  # "compiled": tells which one ran

    monkeypatch.setattr(torch, "compile", fake_compile)
    with compile_on_first_call():
        plain = torch.compile(lambda x: 2 * x, dynamic=False)

        @torch.compile(mode="max-autotune")
        def decorated(x):
            return x - 1

    assert torch.compile is fake_compile and made == []  # restored; nothing compiled yet
    assert plain(3) == 7 and plain(4) == 9 and made == [{"dynamic": False}]
    assert decorated(5) == 5 and made[1:] == [{"mode": "max-autotune"}]


def test_torch_compile_is_restored_when_the_import_inside_fails():
    real = torch.compile
    with pytest.raises(ImportError), compile_on_first_call():
        import no_such_module  # noqa: F401
    assert torch.compile is real


@pytest.mark.parametrize("first", ["", "from transformers import Trainer; "])
def test_the_trial_process_imports_no_inductor(first):
    """The trial process's imports leave Inductor out; bitsandbytes imported by transformers
    first (the order before) brings it in: the deferral is what keeps it out."""
    code = f"import sys; {first}import src.train_qlora; print({INDUCTOR!r} in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == ("True" if first else "False")
