"""Replay the no-pruner run's recorded validation curves through other pruners (offline).

    python docs/pruning_replay.py [sqlite:///storage/pruning-off.db] [storage/trials/demo-pruning]

Exact for this study: training is deterministic and RandomSampler ignores results, so a
pruner seeing these curves decides what it would have decided live (docs/pruning.md).
"""

import json
import sys
from pathlib import Path

import optuna

optuna.logging.set_verbosity(optuna.logging.ERROR)
STORAGE = sys.argv[1] if len(sys.argv) > 1 else "sqlite:///storage/pruning-off.db"
TRIALS = Path(sys.argv[2] if len(sys.argv) > 2 else "storage/trials/demo-pruning")
off = optuna.load_study(study_name="demo-pruning", storage=STORAGE)
comp = optuna.load_study(study_name="demo-pruning--val-loss", storage=STORAGE)
curves = {
    m.user_attrs["trial_number"]: m.intermediate_values
    for m in comp.trials
    if m.intermediate_values
}


def tokens_at(n, step):
    seen = 0
    for line in (TRIALS / str(n) / "stdout.log").read_text().splitlines():
        if line.startswith("SWEEP_PROGRESS "):
            e = json.loads(line[15:])
            if e["event"] == "train" and e["step"] <= step:
                seen = e["tokens"]
    return seen


done = [t for t in off.trials if t.state.name == "COMPLETE"]
full = sum(t.user_attrs["train_tokens"] for t in done)
best_off = max(t.values[0] for t in done)
pruners = {
    "SuccessiveHalving(min 3, rf 3) [the live run]": optuna.pruners.SuccessiveHalvingPruner(
        min_resource=3, reduction_factor=3
    ),
    "SuccessiveHalving(min 6, rf 3)": optuna.pruners.SuccessiveHalvingPruner(
        min_resource=6, reduction_factor=3
    ),
    "SuccessiveHalving(min 3, rf 2)": optuna.pruners.SuccessiveHalvingPruner(
        min_resource=3, reduction_factor=2
    ),
    "Hyperband(min 3, max 24, rf 3)": optuna.pruners.HyperbandPruner(
        min_resource=3, max_resource=24, reduction_factor=3
    ),
    "Median(startup 4, warmup 0)": optuna.pruners.MedianPruner(
        n_startup_trials=4, n_warmup_steps=0
    ),
    "Median(startup 4, warmup 6)": optuna.pruners.MedianPruner(
        n_startup_trials=4, n_warmup_steps=6
    ),
    "Percentile(25, startup 4, warmup 6)": optuna.pruners.PercentilePruner(
        25.0, n_startup_trials=4, n_warmup_steps=6
    ),
    "Percentile(25, startup 2, warmup 3)": optuna.pruners.PercentilePruner(
        25.0, n_startup_trials=2, n_warmup_steps=3
    ),
}
HEADER = ["pruner (replayed on the recorded curves)", "complete", "best accuracy",
          "training tokens", "share of no-pruner tokens"]  # fmt: skip
print("| " + " | ".join(HEADER) + " |\n" + "|---" * len(HEADER) + "|")
for name, pruner in pruners.items():
    study = optuna.create_study(
        study_name="demo-pruning--val-loss", pruner=pruner
    )  # Hyperband hashes it
    spent, kept = 0, []
    for t in off.trials:
        tr = study.ask()
        curve = curves[t.number]
        pruned_at = None
        for step, loss in sorted(curve.items()):
            tr.report(loss, step)
            if tr.should_prune():
                pruned_at = step
                break
        if pruned_at is None:
            study.tell(tr, curve[max(curve)])
            spent += t.user_attrs["train_tokens"]
            kept.append(t)
        else:
            study.tell(tr, state=optuna.trial.TrialState.PRUNED)
            spent += tokens_at(t.number, pruned_at)
    best = max(k.values[0] for k in kept)
    change = f"{100 * (best - best_off):+.2f} pt"
    print(f"| {name} | {len(kept)} | {best:.4f} ({change}) | {spent:,} | {spent / full:.2f} |")
