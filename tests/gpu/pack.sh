#!/usr/bin/env bash
# issue 7 on the GPU machine: trials/hour of short 0.5B-shape SST-2 trials, one at a time vs
# packed onto the card(s) by measured peak memory.
#   bash tests/gpu/pack.sh OUT_DIR [SERIAL_TRIALS] [PACKED_TRIALS] [GPUS]
# SERIAL_TRIALS 0 skips the one-at-a-time run; GPUS like 0 or 0,1 (default 0). Each run gets a
# study of its own (name suffixed with the GPU list), so runs never mix. The packed run goes
# through the sweep's own CUDA MPS daemon (sweep/mps.py); MPS=off: time-sliced instead (study
# suffixed -timesliced).
set -u
out=${1:?OUT_DIR}/pack; serial=${2:-2}; packed=${3:-16}; gpus=${4:-0}; mkdir -p "$out"
cfg=tests/gpu/sweep-gpu.toml; data="data.dir=$PWD/data/gpu-sample"; tag=${gpus//,/-}; mps=auto
[ "${MPS:-auto}" = off ] && { tag=$tag-timesliced; mps=off; }
python3 -m src.random_qwen --shape 0.5B --tokenizer data/gpu-tokenizer \
  --out /tmp/qwen2.5-0.5b-random >/dev/null || exit 1
nvidia-smi --query-gpu=index,memory.used --format=csv,noheader,nounits -lms 1000 \
  > "$out/nvml-$tag.csv" & smi=$!
t0=$SECONDS
if [ "$serial" -gt 0 ]; then
  python3 -m sweep run --study gpu-pack-serial --config $cfg --set "$data" --n-trials $serial \
    2>&1 | grep -E "^trial [0-9]+ (complete|fail|pruned)|rror"
fi
t1=$SECONDS
# a study name per GPU list: a copy of the config beside it (same storage) with the study renamed
copy=tests/gpu/pack-$tag.toml
sed "s/^\[studies.gpu-pack\]/[studies.gpu-pack-$tag]/" $cfg > $copy
python3 -m sweep run --study gpu-pack-$tag --config $copy --set "$data" --gpus $gpus --trials-per-gpu auto \
  --mps $mps --n-trials $packed 2>&1 | grep -E "up to|MPS|^trial [0-9]+ (complete|fail|pruned)|rror"
t2=$SECONDS
kill $smi
python3 -m sweep status --study gpu-pack-$tag --config $copy | tail -4
studies="gpu-pack-$tag"; [ "$serial" -gt 0 ] && studies="gpu-pack-serial $studies"
python3 tests/gpu/phases.py tests/gpu/storage/optuna.db "$out" $studies | tee -a "$out/phases.txt"
max_used=$(awk -F', ' '{ if ($2 > m[$1]) m[$1] = $2 } END { for (g in m) printf "gpu%s %.1f GiB ", g, m[g] / 1024 }' "$out/nvml-$tag.csv")
echo "serial: $serial trials in $((t1 - t0)) s; packed on GPUs $gpus: $packed trials in $((t2 - t1)) s; most memory used: $max_used" | tee -a "$out/summary.txt"
