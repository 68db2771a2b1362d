#!/usr/bin/env bash
# The simulated packed sweep (drive.py) at two commits, alternating, two rounds:
#   git worktree add /tmp/old 9039a25
#   CFG=sweep.toml SIM_RESULT=result.json bash docs/bench/s26/sim/ab.sh /tmp/old .
# CFG: a 32-trial study of any small model with its storage in RUN (default /tmp/sim/run);
# SIM_RESULT: a trial's result.json (the stand-in writes it as its own).
set -u
here=$(cd "$(dirname "$0")" && pwd); py=${PYTHON:-python}; run=${RUN:-/tmp/sim/run}
for round in 1 2; do for root in "$1" "$2"; do
  rm -rf "$run"/{optuna.db,mlflow.db,artifacts,trials}
  (cd "$root" && PYTHONPATH=$PWD $py "$here/drive.py" run --study sim --config "$CFG" --jobs 16 \
    > /dev/null 2>&1)
  echo "$root round $round: $($py "$here/gaps.py" "sqlite:///$run/optuna.db" sim | tail -2 | tr '\n' ' ')"
done; done
