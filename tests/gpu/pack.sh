#!/usr/bin/env bash
# issue 7 on the GPU machine: trials/hour of short 0.5B-shape SST-2 trials, one at a time vs
# packed onto the card(s) by measured peak memory.
#   bash tests/gpu/pack.sh OUT_DIR [SERIAL_TRIALS] [PACKED_TRIALS] [GPUS]
# SERIAL_TRIALS 0 skips the one-at-a-time run; GPUS like 0 or 0,1 (default 0). Each run gets a
# study of its own (name suffixed with the GPU list), so runs never mix. The packed run goes
# through the sweep's own CUDA MPS daemon (sweep/mps.py); MPS=off: time-sliced instead (study
# suffixed -timesliced). PER_GPU: --trials-per-gpu (default auto); TAG: a suffix for another
# run's study (e.g. TAG=spin SWEEP_CUDA_WAIT=spin: packed trials spinning while they wait);
# PACK_SET: one more --set for both runs (e.g. TAG=buckets PACK_SET=train.shape_plan=false).
set -u
out=${1:?OUT_DIR}/pack; serial=${2:-2}; packed=${3:-16}; gpus=${4:-0}; mkdir -p "$out"
cfg=tests/gpu/sweep-gpu.toml; data="data.dir=$PWD/data/gpu-sample"; tag=${gpus//,/-}; mps=auto
[ "${MPS:-auto}" = off ] && { tag=$tag-timesliced; mps=off; }
tag=$tag${TAG:+-$TAG}
python3 -m src.random_qwen --shape 0.5B --tokenizer data/gpu-tokenizer \
  --out /tmp/qwen2.5-0.5b-random >/dev/null || exit 1
nvidia-smi --query-gpu=index,memory.used --format=csv,noheader,nounits -lms 1000 \
  > "$out/nvml-$tag.csv" & smi=$!
# what bounds packed trials: the card's busy share (a kernel running, of any size) and the host
# cores' (user + system %), a line a second stamped with the epoch second
while :; do  # stamped as each line is taken (vmstat, piped, held its lines back in a buffer)
  echo "$EPOCHSECONDS, $(nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader,nounits | head -1)"
  sleep 1
done > "$out/util-gpu-$tag.csv" & util=$!
while :; do  # busy share of all host cores over the last second, from /proc/stat
  read -r _ u n s i w q sq st _ < /proc/stat; sleep 1
  read -r _ u2 n2 s2 i2 w2 q2 sq2 st2 _ < /proc/stat
  b=$(( (u2 + n2 + s2 + q2 + sq2 + st2) - (u + n + s + q + sq + st) ))
  echo "$EPOCHSECONDS, $(( 100 * b / (b + i2 + w2 - i - w + 1) ))"
done > "$out/util-cpu-$tag.csv" & cpu=$!
t0=$SECONDS; e0=$EPOCHSECONDS
if [ "$serial" -gt 0 ]; then
  python3 -m sweep run --study gpu-pack-serial --config $cfg --set "$data" ${PACK_SET:+--set "$PACK_SET"} --n-trials $serial \
    2>&1 | grep -E "^trial [0-9]+ (complete|fail|pruned)|rror"
fi
t1=$SECONDS; e1=$EPOCHSECONDS
# a study name per GPU list: a copy of the config beside it (same storage) with the study renamed
copy=tests/gpu/pack-$tag.toml
sed "s/^\[studies.gpu-pack\]/[studies.gpu-pack-$tag]/" $cfg > $copy
python3 -m sweep run --study gpu-pack-$tag --config $copy --set "$data" ${PACK_SET:+--set "$PACK_SET"} --gpus $gpus --trials-per-gpu ${PER_GPU:-auto} \
  --mps $mps --n-trials $packed 2>&1 | grep -E "up to|MPS|^trial [0-9]+ (complete|fail|pruned)|rror"
t2=$SECONDS; e2=$EPOCHSECONDS
kill $smi $util $cpu 2>/dev/null
busy() {  # median of FILE's second column between two epoch seconds
  awk -F', ' -v a="$2" -v b="$3" '$1 >= a && $1 < b { print $2 }' "$1" | sort -n \
    | awk '{ v[NR] = $1 } END { if (NR) printf "%d %%", v[int((NR + 1) / 2)]; else printf "-" }'
}
python3 -m sweep status --study gpu-pack-$tag --config $copy | tail -4
studies="gpu-pack-$tag"; [ "$serial" -gt 0 ] && studies="gpu-pack-serial $studies"
python3 tests/gpu/phases.py tests/gpu/storage/optuna.db "$out" $studies | tee -a "$out/phases.txt"
max_used=$(awk -F', ' '{ if ($2 > m[$1]) m[$1] = $2 } END { for (g in m) printf "gpu%s %.1f GiB ", g, m[g] / 1024 }' "$out/nvml-$tag.csv")
echo "serial: $serial trials in $((t1 - t0)) s; packed on GPUs $gpus: $packed trials in $((t2 - t1)) s; most memory used: $max_used" | tee -a "$out/summary.txt"
echo "median busy: card $(busy "$out/util-gpu-$tag.csv" $e0 $e1) serial, \
$(busy "$out/util-gpu-$tag.csv" $e1 $e2) packed; host cores (user + system) \
$(busy "$out/util-cpu-$tag.csv" $e0 $e1) serial, $(busy "$out/util-cpu-$tag.csv" $e1 $e2) packed" \
  | tee -a "$out/summary.txt"
