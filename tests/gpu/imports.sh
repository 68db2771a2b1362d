#!/usr/bin/env bash
# How long a trial process's imports take on the GPU machine, without and with a byte-code
# cache. That machine's Python packages come without .pyc files; where Python may not write
# them (PYTHONDONTWRITEBYTECODE) every process compiles torch and transformers again, while a
# user's pip install writes them once (pip compiles by default). Prints one line per import.
#   bash tests/gpu/imports.sh OUT_DIR      then, for the runs after it, the same cache:
#   export PYTHONPYCACHEPREFIX=/tmp/pyc; unset PYTHONDONTWRITEBYTECODE
set -u
out=${1:?OUT_DIR}/imports; mkdir -p "$out"
python3 -c "import os, sys, torch; print('dont_write_bytecode', sys.dont_write_bytecode,
  'PYTHONDONTWRITEBYTECODE', os.environ.get('PYTHONDONTWRITEBYTECODE'),
  'torch writable', os.access(os.path.dirname(torch.__file__), os.W_OK))" | tee "$out/env.txt"
n=$(find "$(python3 -c 'import os, torch; print(os.path.dirname(torch.__file__))')" -name '*.pyc' | wc -l)
echo "torch .pyc files: $n" | tee -a "$out/env.txt"
timed() {  # label, then the environment for one import of the trial's module
  local began=$EPOCHREALTIME
  env "${@:2}" python3 -X importtime -c "import src.train_qlora" 2>"$out/importtime-$1.txt"
  echo "import src.train_qlora, $1: $(python3 -c "print(round($EPOCHREALTIME - $began, 2))") s" \
    | tee -a "$out/env.txt"
}
timed as-is PYTHONDONTWRITEBYTECODE="${PYTHONDONTWRITEBYTECODE:-}"
timed cache-first -u PYTHONDONTWRITEBYTECODE PYTHONPYCACHEPREFIX=/tmp/pyc
timed cache-second -u PYTHONDONTWRITEBYTECODE PYTHONPYCACHEPREFIX=/tmp/pyc
gzip -f "$out"/importtime-*.txt
