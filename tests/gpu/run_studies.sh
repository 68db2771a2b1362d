#!/usr/bin/env bash
# issue 4's studies on the GPU machine (docs/studies.md): random-weight Qwen2.5 shapes, real
# SST-2 rows, the default 24 GiB budget. Results (storage, trial results, logs) go to $1.
#   bash tests/gpu/run_studies.sh OUT_DIR [DATA_DIR]
set -u
out=${1:?OUT_DIR}; data=${2:-$PWD/data/gpu-sample}; started=$SECONDS
for shape in 0.5B 1.5B 3B 7B; do
  python3 -m src.random_qwen --shape $shape --tokenizer data/gpu-tokenizer \
    --out /tmp/qwen2.5-${shape,,}-random >/dev/null || exit 1
done
echo "checkpoints built in $((SECONDS - started)) s"
for study in gpu-methods gpu-vram-scaling; do
  timeout ${STUDY_TIMEOUT:-270} python3 -m sweep run --study $study --config tests/gpu/sweep-gpu.toml \
    --set data.dir="$data" 2>&1 | grep -E "^trial|error" ; echo "$study done at $((SECONDS - started)) s"
  python3 -m sweep status --study $study --config tests/gpu/sweep-gpu.toml
done
python3 - "$out" <<'PY'
import shutil, sqlite3, sys
from pathlib import Path
out, storage = Path(sys.argv[1]), Path("tests/gpu/storage")
for db in ("optuna.db", "mlflow.db"):
    sqlite3.connect(storage / db).backup(sqlite3.connect(out / db))
for f in storage.glob("trials/*/*/*"):
    if f.is_file() and f.suffix in (".json", ".log"):
        (out / f.relative_to(storage)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, out / f.relative_to(storage))
PY
