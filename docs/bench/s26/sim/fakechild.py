"""A stand-in for `python -m src.train_qlora` speaking its protocol: no torch, sleeps."""

import json
import os
import sys
import time
from pathlib import Path

TEMPLATE = json.loads(Path(os.environ["SIM_RESULT"]).read_text())
STEP_S = float(os.environ.get("SIM_STEP_S", "0.2"))


def emit(ev, **kw):
    print(
        "SWEEP_PROGRESS " + json.dumps({"event": ev, "time": round(time.time(), 3), **kw}),
        flush=True,
    )


def run(spec):
    d = Path(spec).parent
    emit("start")
    time.sleep(0.5)
    emit("model", source="x", base="kept", method="qlora")
    emit("data", train=100, val=8, eval=16)
    emit("train_begin")
    for s in range(1, 31):
        time.sleep(STEP_S)
        emit("train", step=s, loss=1.0 / s, tokens=200 * s)
        if s % 10 == 0:
            emit("validating", step=s)
            time.sleep(0.1)
            emit("eval", step=s, val_loss=1.0 / s)
    emit("train_end")
    (d / "adapter").mkdir(exist_ok=True)
    (d / "adapter" / "adapter_model.safetensors").write_bytes(os.urandom(2_000_000))
    (d / "adapter" / "adapter_config.json").write_text("{}")
    emit("saved", folder="adapter")
    emit("evaluating", examples=16, train_peak_gib=2.0)
    time.sleep(1.0)
    (d / "result.json").write_text(json.dumps(TEMPLATE))
    emit("done", status="success", metrics=TEMPLATE["metrics"])


trials = int(sys.argv[sys.argv.index("--trials") + 1])
first = sys.argv[-1]
time.sleep(float(os.environ.get("SIM_IMPORT_S", "2")))
if first != "-":
    run(first)
    trials -= 1
emit("ready")
while trials > 0:
    line = sys.stdin.readline().strip()
    if not line:
        break
    run(line)
    trials -= 1
    if trials:
        emit("ready")
