import sys
import time

t = time.perf_counter()
if sys.argv[1] == "old":  # bitsandbytes imported by transformers/peft first, as before
    from transformers import Trainer  # noqa
import src.train_qlora  # noqa

print(
    sys.argv[1],
    f"{time.perf_counter() - t:.2f}",
    "inductor" if "torch._inductor.compile_fx" in sys.modules else "-",
    flush=True,
)
