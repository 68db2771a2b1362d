#!/usr/bin/env bash
# issue 7 on the GPU machine: trials/hour of short 0.5B-shape SST-2 trials, one at a time vs
# packed onto the card(s) by learned peak memory. GPUS=0,1 for two cards.
#   bash tests/gpu/pack.sh OUT_DIR [SERIAL_TRIALS] [PACKED_TRIALS]
set -u
out=${1:?OUT_DIR}/pack; serial=${2:-2}; packed=${3:-16}; gpus=${GPUS:-0}; mkdir -p "$out"
cfg=tests/gpu/sweep-gpu.toml; data="data.dir=$PWD/data/gpu-sample"
python3 -m src.random_qwen --shape 0.5B --tokenizer data/gpu-tokenizer \
  --out /tmp/qwen2.5-0.5b-random >/dev/null || exit 1
nvidia-smi --query-gpu=index,memory.used --format=csv,noheader,nounits -lms 1000 \
  > "$out/nvml.csv" & smi=$!
t0=$SECONDS
python3 -m sweep run --study gpu-pack-serial --config $cfg --set "$data" --n-trials $serial \
  2>&1 | grep -E "^trial [0-9]+ (complete|fail|pruned)|rror"
t1=$SECONDS
python3 -m sweep run --study gpu-pack --config $cfg --set "$data" --gpus $gpus \
  --trials-per-gpu auto --n-trials $packed 2>&1 | grep -E "up to|^trial [0-9]+ (on|complete|fail|pruned)|rror"
t2=$SECONDS
kill $smi
python3 -m sweep status --study gpu-pack --config $cfg | tail -6
for s in gpu-pack-serial gpu-pack; do python3 - "$s" "$out" <<'PY'
import json, sys, optuna
study, out = sys.argv[1], sys.argv[2]
trials = optuna.load_study(study_name=study, storage="sqlite:///tests/gpu/storage/optuna.db").trials
rows = [{"number": t.number, "state": t.state.name, "start": t.datetime_start.isoformat(),
         "end": t.datetime_complete.isoformat() if t.datetime_complete else None,
         **{k: t.user_attrs.get(k) for k in ("gpu", "peak_memory_gib", "nvml_peak_gib", "status", "reason")}}
        for t in trials]
json.dump(rows, open(f"{out}/{study}.json", "w"), indent=1)
PY
done
max_used=$(awk -F', ' '{ if ($2 > m[$1]) m[$1] = $2 } END { for (g in m) printf "gpu%s %.1f GiB ", g, m[g] / 1024 }' "$out/nvml.csv")
echo "serial: $serial trials in $((t1 - t0)) s; packed on GPUs $gpus: $packed trials in $((t2 - t1)) s; most memory used: $max_used" | tee "$out/summary.txt"
