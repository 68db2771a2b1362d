"""What 16 slots can give the pack run at best (issue 22's 12x target), from the stored
timelines of sessions 24-29 (`bash tests/gpu/warm.sh OUT pack`: 8 trials one at a time, then
32 packed, 16 at once on the H200).

    python3 docs/bench/s32/bound.py

Per session: the serial and packed trials/hour and their ratio as measured; the packed run
perfectly packed (its first processes' imports, then every trial's own seconds, start to end
as measured at that packing, spread over the 16 slots with none ever idle: no placement of
those trials beats it); and where the idle slot-seconds of the real run went: before the last
trial started (the first wave held back until a peak was known, hand-over gaps) and after it
(the tail, fewer trials left than slots). With the serial run's wall time W_s = I_s + 8 T (one
cold import, then 8 trials of T each, their spares imported behind them) and the packed run's
at best I_p + 2 T_p (32 trials in 2 waves of 16), the ratio is at most
4 (I_s + 8 T) / (I_p + 2 T_p). With one import time I for both and packed trials as fast as a
trial alone (T_p = T) that is 12x exactly where T = I, and less where a trial is shorter than
an import: the 0.5B pack trials (T 9-11 s, I 8.5-12 s) sit at that edge.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(HERE.parent.parent))  # the repository root: tests/gpu/phases.py
from tests.gpu.phases import perfectly_packed  # noqa: E402

SLOTS = 16
RUNS = ["s24/pack", "s25/pack", "s26/pack", "s27/pack", "warm/s29/pack"]


def finished(path: Path) -> list[dict]:
    return [r for r in json.loads(path.read_text()) if r.get("complete")]


def wall(rows: list[dict]) -> float:
    return max(r["complete"] for r in rows) - min(r["launch"] for r in rows)


def idle(rows: list[dict], step: float = 0.05) -> tuple[float, float]:
    """Idle slot-seconds after the first imports: before the last trial started, after."""
    t0 = min(r["launch"] for r in rows)
    first = min(r["start"] for r in rows) - t0
    last = max(r["start"] for r in rows) - t0
    end = wall(rows)
    before = after = 0.0
    t = first
    while t < end:
        running = sum(r["start"] - t0 <= t < r["complete"] - t0 for r in rows)
        free = max(0, SLOTS - running) * step
        before, after = (before + free, after) if t < last else (before, after + free)
        t += step
    return before, after


def main() -> None:
    print(
        "run | serial /h | packed /h | ratio | I_s s | I_p s | T s | T_p s"
        " | perfectly packed s (ratio) | idle slot-s before / after the last start"
    )
    for run in RUNS:
        serial, packed = (
            finished(HERE / run / "gpu-pack-serial.json"),
            finished(HERE / run / "gpu-pack-0.json"),
        )
        per_h = [3600 * len(rows) / wall(rows) for rows in (serial, packed)]
        first, ideal = perfectly_packed(packed, SLOTS)
        cold = min(r["start"] for r in serial) - min(r["launch"] for r in serial)
        trial_s = [r["complete"] - r["start"] for r in packed]
        t_serial = statistics.median(r["complete"] - r["start"] for r in serial)
        before, after = idle(packed)
        print(
            f"{run} | {per_h[0]:.0f} | {per_h[1]:.0f} | {per_h[1] / per_h[0]:.1f}x | "
            f"{cold:.1f} | {first:.1f} | {t_serial:.1f} | {statistics.mean(trial_s):.1f} | "
            f"{ideal:.1f} ({3600 * len(packed) / ideal / per_h[0]:.1f}x) | "
            f"{before:.0f} / {after:.0f}"
        )


if __name__ == "__main__":
    main()
