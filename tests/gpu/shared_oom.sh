#!/usr/bin/env bash
# A trial that runs out of GPU memory on a card other trials share is run again, not stored
# infeasible (sweep/trial.py `shared_oom`). 4 short 0.5B trials packed on GPU 0 while another
# process (the "hog") takes all but HEADROOM GiB of the card for HOLD_S seconds from the start:
# trials that load their model meanwhile run out of memory, fail as `oom_shared` and are queued
# again; their retries, started after the hog let go, complete.
#   bash tests/gpu/shared_oom.sh OUT_DIR
set -u
out=${1:?OUT_DIR}/shared-oom; mkdir -p "$out"
cfg=tests/gpu/sweep-gpu.toml; data="data.dir=$PWD/data/gpu-sample"
python3 -m src.random_qwen --shape 0.5B --tokenizer data/gpu-tokenizer \
  --out /tmp/qwen2.5-0.5b-random >/dev/null || exit 1
python3 - "${HEADROOM:-3}" "${HOLD_S:-22}" <<'PY' > "$out/hog.txt" 2>&1 &
import sys, time, torch
free, _ = torch.cuda.mem_get_info()
keep = int(free - float(sys.argv[1]) * 1024**3)
hog = torch.empty(keep, dtype=torch.uint8, device="cuda")
print(f"hog holds {keep / 1024**3:.1f} GiB for {sys.argv[2]} s", flush=True)
time.sleep(float(sys.argv[2]))
del hog
print("hog let go", flush=True)
PY
sleep 5  # the hog holds its memory before the trials load their models
python3 -m sweep run --study gpu-pack --config $cfg --set "$data" --storage "sqlite:///$out/o.db" \
  --gpus 0 --trials-per-gpu 4 --n-trials ${TRIALS:-4} 2>&1 | grep -E "^trial [0-9]+|rror" | tee "$out/sweep.txt"
wait
cat "$out/hog.txt"
python3 - "$out/o.db" <<'PY' | tee "$out/trials.txt"
import sys, optuna
for t in optuna.load_study(study_name="gpu-pack", storage=f"sqlite:///{sys.argv[1]}").trials:
    print(t.number, t.state.name, t.user_attrs.get("reason"), t.system_attrs.get("failed_trial"), t.values)
PY
