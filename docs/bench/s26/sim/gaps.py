"""Timeline of a packed sweep: per trial its launch (spec.json written), the trial process's
start and done events, and Optuna's completion; and how long a freed slot waited for the next
launch (the k-th completion against the (slots + k)-th launch).
    python gaps.py OPTUNA_URL STUDY [SLOTS]
"""

import json
import logging
import statistics
import sys
from pathlib import Path

import optuna

optuna.logging.set_verbosity(logging.WARNING)
url, name = sys.argv[1], sys.argv[2]
slots = int(sys.argv[3]) if len(sys.argv) > 3 else 16
rows = []
for trial in optuna.load_study(study_name=name, storage=url).trials:
    folder = Path(trial.user_attrs["trial_dir"])
    seen = {}
    for line in (folder / "stdout.log").read_text().splitlines():
        if line.startswith("SWEEP_PROGRESS "):
            event = json.loads(line[len("SWEEP_PROGRESS ") :])
            seen.setdefault(event["event"], event["time"])
    rows.append(
        {
            "n": trial.number,
            "launch": (folder / "spec.json").stat().st_mtime,
            "start": seen.get("start"),
            "done": seen.get("done"),
            "complete": trial.datetime_complete.timestamp(),
        }
    )
t0 = min(r["launch"] for r in rows)
for r in sorted(rows, key=lambda r: r["launch"]):
    times = [
        f"{r[k] - t0:5.1f}" if r[k] else "  -  " for k in ("launch", "start", "done", "complete")
    ]
    print(r["n"], *times)
completes = sorted(r["complete"] for r in rows)
launches = sorted(r["launch"] for r in rows)
waits = [b - a for a, b in zip(completes, launches[slots:], strict=False)]
print(f"{len(rows)} trials, first launch to last end {completes[-1] - t0:.1f} s")
if waits:
    print(f"freed slot -> launch: median {statistics.median(waits):.2f} s, max {max(waits):.2f} s")
