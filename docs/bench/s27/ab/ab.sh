#!/usr/bin/env bash
# Session 27, on the GPU machine: validation's capture rule (77e4102) against the rule off
# (old/sitecustomize.py), alternating in one call, on the 0.5B shape's real SST-2 rows:
#   A: the pack run's trial (30 steps, 2 validations of 64 rows), 3 trials in one worker
#   B: 100 steps, 2 validations of 256 rows (AlpacaEval's validation layout), 2 trials
#   bash docs/bench/s27/ab/ab.sh OUT_DIR   (after the wheel install; PYTHONPATH holds $PWD)
set -u
out=${1:?OUT_DIR}/ab; mkdir -p "$out"; here=docs/bench/s27/ab
cfg=tests/gpu/sweep-gpu.toml; data="data.dir=$PWD/data/gpu-sample"
python3 -m src.random_qwen --shape 0.5B --tokenizer data/gpu-tokenizer \
  --out /tmp/qwen2.5-0.5b-random >/dev/null || exit 1
bench() {  # NAME RULE(old|new) ARGS...
  local name=$1 rule=$2; shift 2
  local path=$PYTHONPATH; [ "$rule" = old ] && path=$PWD/$here/old:$PYTHONPATH
  PYTHONPATH=$path python3 -m sweep bench --overhead --warm --config $cfg --study gpu-pack \
    --set "$data" --out "$out/$name-$rule" "$@" 2>&1 | grep -E "^\| |median outside"
}
for round in 1 2; do
  for rule in old new; do bench A$round $rule --steps 30 --trials 3; done
done
for rule in old new; do
  bench B $rule --steps 100 --trials 2 --set train.eval_every=50 --set train.val_examples=256
done
