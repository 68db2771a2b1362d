#!/usr/bin/env bash
# issue 6 on the GPU machine: `sweep bench` (plain recipe vs trial path) on the 0.5B and 7B
# shapes, and the overhead of one real 200-step 0.5B trial (warm spare, as in a sweep).
# Results go to $1/bench.
#   bash tests/gpu/bench.sh OUT_DIR
set -u
out=${1:?OUT_DIR}/bench; started=$SECONDS
python3 -m src.random_qwen --shape 0.5B --tokenizer data/gpu-tokenizer \
  --out /tmp/qwen2.5-0.5b-random >/dev/null || exit 1
bench() {  # quiet: the Markdown table and the one-line progress of each recipe
  python3 -m sweep bench --tokenizer data/gpu-tokenizer --out "$out" "$@" 2>&1 \
    | grep -vE "^\{|SWEEP_PROGRESS \{\"event\": \"(train|model|train_begin|train_end)\"|Loading|Warning|warn"
  echo "bench $* done at $((SECONDS - started)) s"
}
bench --model 0.5B ${BENCH_05B:-}
python3 -m sweep bench --overhead --warm --config tests/gpu/sweep-gpu.toml --study gpu-sst2 \
  --steps 200 --set data.dir="$PWD/data/gpu-sample" --out "$out" 2>&1 | grep -vE "SWEEP_PROGRESS|Loading"
bench --model 7B ${BENCH_7B:-}
echo "all done at $((SECONDS - started)) s"
