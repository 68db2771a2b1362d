#!/usr/bin/env bash
# issue 22 on the GPU machine: warm trial workers (0.5B shape, real SST-2 rows).
#   bash tests/gpu/warm.sh OUT_DIR overhead   # 5 trials in one worker, then 2 fresh processes
#   bash tests/gpu/warm.sh OUT_DIR pack       # 8 one at a time (fresh process each) vs 32 packed
#   PACK_MORE=1: also 32 packed spinning while they wait, and 32 packed 24 at once
set -u
out=${1:?OUT_DIR}/warm; mkdir -p "$out"
cfg=tests/gpu/sweep-gpu.toml; data="data.dir=$PWD/data/gpu-sample"; steps=${STEPS:-200}
python3 -m src.random_qwen --shape 0.5B --tokenizer data/gpu-tokenizer \
  --out /tmp/qwen2.5-0.5b-random >/dev/null || exit 1
case ${2:?overhead or pack} in
overhead)
  # one configuration 5 times through one worker (the first trial loads the base, the others
  # take it), then twice in a process of its own: overhead, memory objective and loss curve
  python3 -m sweep bench --overhead --warm --config $cfg --study gpu-sst2 --steps $steps \
    --trials ${TRIALS:-5} --set "$data" --out "$out/worker" 2>&1 | grep -vE "SWEEP_PROGRESS|Loading|warn"
  for i in 1 2; do
    python3 -m sweep bench --overhead --config $cfg --study gpu-sst2 --steps $steps --set "$data" \
      --out "$out/fresh$i" 2>&1 | grep "recorded"
  done
  python3 tests/gpu/warm_compare.py "$out" | tee "$out/compare.txt" ;;
pack)  # then the same 32 packed with their waits spinning (CUDA's default), and 24 at once
  bash tests/gpu/pack.sh "$out" 8 32 0
  [ -n "${PACK_MORE:-}" ] || exit 0
  TAG=spin SWEEP_CUDA_WAIT=spin bash tests/gpu/pack.sh "$out" 0 32 0
  TAG=24 PER_GPU=24 bash tests/gpu/pack.sh "$out" 0 32 0 ;;
esac
