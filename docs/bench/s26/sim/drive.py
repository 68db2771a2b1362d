"""A packed sweep simulated on the CPU: the real sweep process (`python -m sweep run`) with its
trial processes replaced by fakechild.py (same protocol, sleeps: 30 steps of 0.2 s, 2 s imports).
  SIM_RESULT=any/result.json python docs/bench/s26/sim/drive.py run --study sim \
    --config sweep.toml --jobs 16   # sweep.toml: a 32-trial study of any small model
  python docs/bench/s26/sim/gaps.py sqlite:///optuna.db TRIALS_DIR sim
"""

import subprocess
import sys
from pathlib import Path

from sweep import __main__ as main
from sweep import trial_process

real = subprocess.Popen


def popen(args, *a, **kw):
    if args[:3] == [sys.executable, "-m", "src.train_qlora"]:
        args = [sys.executable, str(Path(__file__).with_name("fakechild.py")), *args[3:]]
    return real(args, *a, **kw)


trial_process.subprocess.Popen = popen
sys.argv = ["sweep", *sys.argv[1:]]
sys.exit(main.main())
