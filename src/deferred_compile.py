"""bitsandbytes imported with its import-time `torch.compile` calls deferred to their first call.

bitsandbytes (0.50.2, here and in the device wheels) wraps its CPU kernels
(`backends/default/ops.py`, imported on every device) in `torch.compile` as it is imported,
and `torch.compile` imports TorchDynamo and Inductor there and then, though nothing is
compiled before a call: `import src.train_qlora` took a median 4.84 s with it and 4.00 s
without on this project's 2-core CPU (docs/bench/README.md, session 28), paid by every fresh
trial process, on a GPU too, where those CPU kernels never run.
Imported here first, inside `compile_on_first_call`, each of those wrappers calls the real
`torch.compile` at its own first call instead; bitsandbytes catches a failure there as it
catches one at import (`_try_torch_compile` falls back to the plain function either way), so
what runs is unchanged. Written by hand: neither bitsandbytes nor torch has a switch for it.

Import this module before transformers and peft, which import bitsandbytes.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator

import torch


@contextlib.contextmanager
def compile_on_first_call() -> Iterator[None]:
    """Inside: `torch.compile(fn, **options)` returns a function that compiles `fn` with those
    options at its first call (once) and calls the compiled function from then on."""
    real = torch.compile

    def deferred(model: Callable | None = None, **options):
        if model is None:  # used as @torch.compile(**options)
            return lambda fn: deferred(fn, **options)
        compiled: list[Callable] = []

        @functools.wraps(model)
        def call(*args, **kwargs):
            if not compiled:
                compiled.append(real(model, **options))
            return compiled[0](*args, **kwargs)

        return call

    torch.compile = deferred
    try:
        yield
    finally:
        torch.compile = real


with compile_on_first_call():
    import bitsandbytes  # noqa: F401
