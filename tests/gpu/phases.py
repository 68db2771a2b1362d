"""Where the time of packed trials goes (tests/gpu/pack.sh): per trial, from its spec file's
time (launch) and its progress events' times, the phases import, set-up, training,
evaluation and the sweep's bookkeeping; medians per study and the most trials at once; and,
for a packed study, its trials perfectly packed: the first process's imports, then every
trial's own seconds (start to end, as measured at this packing) spread evenly over the slots
with no slot ever idle, the wall time no placement of these trials could beat.

    python3 tests/gpu/phases.py OPTUNA_DB OUT_DIR STUDY [STUDY ...]
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import optuna

PREFIX = "SWEEP_PROGRESS "
PHASES = [  # (name, from event, to event)
    ("imports (or spare hand-over)", "launch", "start"),
    ("model, data, trainer set-up", "start", "train_begin"),
    ("training incl. validation", "train_begin", "train_end"),
    ("evaluation and saving", "train_end", "done"),
    ("sweep bookkeeping", "done", "complete"),
]


def times(trial: optuna.trial.FrozenTrial) -> dict[str, float]:
    trial_dir = Path(trial.user_attrs["trial_dir"])
    seen = {"launch": (trial_dir / "spec.json").stat().st_mtime}
    for line in (trial_dir / "stdout.log").read_text().splitlines():
        if line.startswith(PREFIX):
            event = json.loads(line[len(PREFIX) :])
            seen.setdefault(event["event"], event.get("time"))
    if trial.datetime_complete:
        seen["complete"] = trial.datetime_complete.timestamp()
    return seen


def main(db: str, out: Path, studies: list[str]) -> None:
    import optuna  # here: `perfectly_packed` is used without it (docs/bench/s32/bound.py)

    for name in studies:
        trials = optuna.load_study(study_name=name, storage=f"sqlite:///{db}").trials
        rows = []
        for trial in trials:
            seen = times(trial)
            rows.append(
                {
                    "number": trial.number,
                    "state": trial.state.name,
                    **seen,
                    **{k: trial.user_attrs.get(k) for k in ("gpu", "peak_memory_gib")},
                }
            )
        (out / f"{name}.json").write_text(json.dumps(rows, indent=1))
        spans = [(r["launch"], r["complete"]) for r in rows if r.get("complete")]
        most = max(sum(a <= t < b for a, b in spans) for t, _ in spans)
        wall = max(b for _, b in spans) - min(a for a, _ in spans)
        print(
            f"{name}: {len(spans)} trials, first launch to last end {wall:.0f} s "
            f"({3600 * len(spans) / wall:.0f}/h), up to {most} at once"
        )
        for phase, start, end in PHASES:
            took = [r[end] - r[start] for r in rows if r.get(start) and r.get(end)]
            if took:
                print(
                    f"  {phase:30s} median {statistics.median(took):6.1f} s  max {max(took):6.1f} s"
                )
        total = [r["complete"] - r["launch"] for r in rows if r.get("complete")]
        print(f"  {'whole trial':30s} median {statistics.median(total):6.1f} s")
        if most > 1:
            done = [r for r in rows if r.get("complete") and r.get("start")]
            first, ideal = perfectly_packed(done, most)
            print(
                f"  perfectly packed: first imports {first:.1f} s + trial seconds / {most} "
                f"slots = {ideal:.1f} s ({3600 * len(done) / ideal:.0f}/h)"
            )
        graphs = [g for trial in trials if (g := result(trial).get("graphs"))]
        if graphs:  # what the CUDA graphs cost each trial (src/cuda_graphs.GraphSet.stats)
            keys = ("capture_s", "training", "evaluation", "eager_calls", "inferred")
            med = {k: statistics.median(g.get(k) or 0 for g in graphs) for k in keys}
            probes = statistics.median(len(g.get("probes", [])) for g in graphs)
            print(f"  graphs per trial (median): captured {med['training']:.0f} training + "
                  f"{med['evaluation']:.0f} evaluation in {med['capture_s']:.1f} s, "
                  f"{med['eager_calls']:.0f} eager calls, {probes:.0f} probes, "
                  f"{med['inferred']:.0f} decided unprobed")  # fmt: skip


def perfectly_packed(rows: list[dict], slots: int) -> tuple[float, float]:
    """(first imports, wall time) of finished trials' timeline rows perfectly packed on
    `slots`: the first process's imports, then every trial's own seconds spread evenly."""
    first = min(r["start"] for r in rows) - min(r["launch"] for r in rows)
    return first, first + sum(r["complete"] - r["start"] for r in rows) / slots


def result(trial: optuna.trial.FrozenTrial) -> dict:
    """The trial's result.json (empty where it wrote none)."""
    path = Path(trial.user_attrs["trial_dir"]) / "result.json"
    return json.loads(path.read_text()) if path.is_file() else {}


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), sys.argv[3:])
