"""On the GPU machine: how a trial process waits for its card (src/speed.cuda_waits).

pytest -m gpu tests/gpu/test_speed.py   (no model needed)
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.gpu

# a child process (the flags hold only before its CUDA context exists): ~2 s of matmuls
# queued, then one wait for them; what its context's flags are, and the CPU time the wait took
CHILD = """
import ctypes, json, sys, time
import torch
from src import speed
mode = sys.argv[1]
set_ = speed.cuda_waits(mode)
x = torch.randn(8192, 8192, device="cuda")
torch.cuda.synchronize()
for _ in range(100):
    x = torch.tanh(x @ x)
queued, cpu = time.perf_counter(), time.process_time()
torch.cuda.synchronize()
waited, cpu = time.perf_counter() - queued, time.process_time() - cpu
cuda, device = ctypes.CDLL("libcuda.so.1"), ctypes.c_int()
flags, active = ctypes.c_uint(), ctypes.c_int()
cuda.cuDeviceGet(ctypes.byref(device), 0)
cuda.cuDevicePrimaryCtxGetState(device, ctypes.byref(flags), ctypes.byref(active))
print(json.dumps({"set": set_, "flags": flags.value, "waited_s": waited, "cpu_s": cpu}))
"""


def _child(mode: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_blocking_wait_sleeps_and_a_spinning_one_keeps_its_core_busy():
    block, spin = _child("block"), _child("spin")
    print(f"block {block}\nspin {spin}")
    assert block["set"] and block["flags"] & 7 == 4
    assert spin["set"] and spin["flags"] & 7 == 1
    assert block["waited_s"] > 0.3 and spin["waited_s"] > 0.3  # the card was still busy
    assert block["cpu_s"] < 0.2 * block["waited_s"]  # asleep while it waited
    assert spin["cpu_s"] > 0.7 * spin["waited_s"]  # a core spinning the whole wait
