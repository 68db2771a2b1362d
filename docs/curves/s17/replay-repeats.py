"""Session 17: how often the replay (default strategy, seed noise, 4 in flight, 20 seeds) asks
for a configuration it already ran in that seed (a sampled one snaps to the nearest of the
table's 100), and how often first-time and repeated configurations are pruned.

    .venv/bin/python docs/curves/s17/replay-repeats.py
"""

import collections
import warnings
from pathlib import Path

import optuna
from optuna.trial import TrialState

from sweep import config, curves, replay

optuna.logging.set_verbosity(optuna.logging.WARNING)
warnings.simplefilter("ignore")
data = curves.read(Path("docs/curves/sst2-smollm2.json.xz"))
table = replay.Table(data)
study_cfg, default = replay.study_for(data, config.load(Path("sweep.toml")), None)
noise = table.noise_floor()["sd_points"] / table.points
snapped, states = [], {}
snap, tell = table.snap, optuna.study.Study.tell


def snap_logged(params):
    run = snap(params)
    snapped.append(id(run))
    return run


def tell_logged(self, trial, values=None, state=None, **kw):
    if len(self.directions) == 2:  # the main study, not the validation-loss companion
        states[trial.number] = state or TrialState.COMPLETE
    return tell(self, trial, values, state, **kw)


table.snap, optuna.study.Study.tell = snap_logged, tell_logged
counts = collections.Counter()
for seed in range(20):
    snapped.clear()
    states.clear()
    replay.replay_one(
        table, study_cfg, default, seed, 30 * table.full_trial_s, "maximize", noise, 4
    )
    seen = set()
    for number, run in enumerate(snapped):
        kind = "repeat" if run in seen else "first"
        seen.add(run)
        if number in states:  # told (a trial cut at the budget is not)
            counts[kind, states[number].name] += 1
for kind in ("first", "repeat"):
    done, pruned = counts[kind, "COMPLETE"], counts[kind, "PRUNED"]
    print(f"{kind:6s} configurations: {done + pruned} trials, {pruned} pruned "
          f"({100 * pruned / (done + pruned):.0f} %)")  # fmt: skip
