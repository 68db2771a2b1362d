#!/usr/bin/env bash
# issue 17 on the GPU machine: the fast generation's GPU tests, then the whole-trial benchmark
# (plain recipe + model.generate against the trial path) on AlpacaEval with the 0.5B shape and
# on SQuAD with the 7B shape. Results (JSON + Markdown) go to $1/bench.
#   bash tests/gpu/whole_trial.sh OUT_DIR [alpacaeval|squad|tests ...]
# data/gpu-sample (git-ignored, carried along) holds sst2/ and squad/ of ../shared/data, and for
# alpacaeval alpaca/alpaca_data_5000.json.xz and alpacaeval/ without most annotation files
# (all of them are 63 MB, over what one call may carry with .whl/; preflight needs some):
# `bash tests/gpu/inputs.sh` builds it, with .whl/ and data/gpu-tokenizer.
set -u
out=${1:?OUT_DIR}/bench; shift; what=${*:-tests alpacaeval squad}; started=$SECONDS
data="data.dir=$PWD/data/gpu-sample"; mkdir -p "$out"
variants=${VARIANTS:-"--variant all-logits:labelled_logits=false --variant sdpa:packed_attention=false"}
[ "$variants" = none ] && variants=""
quiet() { grep -vE "SWEEP_PROGRESS|Loading|Warning|warn|^\s*$" || true; }
for step in $what; do
  case $step in
  tests)
    python3 -m src.random_qwen --shape 0.5B --tokenizer data/gpu-tokenizer \
      --out /tmp/qwen2.5-0.5b-random >/dev/null || exit 1
    SWEEP_GPU_MODEL=/tmp/qwen2.5-0.5b-random python3 -m pytest -m gpu -q -p no:cacheprovider \
      tests/gpu/test_generation.py tests/gpu/test_packed_attention.py \
      tests/gpu/test_optimizer.py 2>&1 | tail -15 ;;
  alpacaeval)  # 64 instructions, 512 new tokens; the judge left out (no key: win rate unset);
    # all-logits: a lower training peak (smaller validation logits) also lowers the memory
    # evaluation may use (dense weights, batch): does generation slow down? (ALPACA_VARIANTS=
    # "": none; or "--variant NAME:key=value ...")
    python3 -m sweep bench --whole-trial --study alpacaeval --model 0.5B \
      --tokenizer data/gpu-tokenizer --out "$out" --set "$data" --set train.max_steps=100 \
      --set eval.max_examples=64 --set eval.max_new_tokens=512 \
      --set 'eval.judge={name="openai", model="none", api_key_env="SWEEP_NO_JUDGE"}' \
      ${ALPACA_VARIANTS---variant all-logits:labelled_logits=false} 2>&1 | quiet ;;
  squad)  # the squad study's batch, sequence length and new tokens; 100 steps, 1,000 questions;
    # PROFILE=1: torch.profiler over steps 60-63 (it slows both recipes: not for the target);
    # variants: every position's logits also in validation, and masked SDPA instead of packed
    # attention (VARIANTS=none: plain and trial alone, ~5 min instead of ~9; VARIANTS="--variant
    # NAME:key=value ...": those instead)
    python3 -m sweep bench --whole-trial --study squad --model 7B \
      --tokenizer data/gpu-tokenizer --out "$out" --set "$data" --set train.max_steps=100 \
      --set eval.max_examples=1000 ${PROFILE:+--profile} $variants 2>&1 | quiet ;;
  esac
  echo "$step done at $((SECONDS - started)) s"
done
