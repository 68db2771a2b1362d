"""Fresh process against warm worker, from tests/gpu/warm.sh's overhead runs: the memory
objective and the training loss curve of one configuration.

    python tests/gpu/warm_compare.py OUT/warm
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def trials(folder: Path) -> list[dict]:
    (path,) = folder.glob("*.json")
    data = json.loads(path.read_text())
    return [run["trial"] for run in data.get("runs", [data])]


def loss_gap(a: dict, b: dict) -> float:
    """Largest relative difference of two training loss curves, step by step."""
    pairs = zip(a["curve"]["train"], b["curve"]["train"], strict=True)
    return max(abs(x[2] - y[2]) / abs(x[2]) for x, y in pairs)


def main(root: Path) -> None:
    worker = trials(root / "worker")
    fresh = [trials(root / f"fresh{i}")[0] for i in (1, 2)]
    base = fresh[0]["peak_memory_gib"]
    print(
        "memory objective (GiB): fresh "
        + ", ".join(f"{t['peak_memory_gib']:.3f}" for t in fresh)
        + " · worker trials 1-5 "
        + ", ".join(f"{t['peak_memory_gib']:.3f}" for t in worker)
    )
    worst = max(abs(t["peak_memory_gib"] - base) / base for t in worker + fresh[1:])
    print(f"largest difference from the first fresh process: {100 * worst:.2f} % (target <= 2 %)")
    between = loss_gap(fresh[0], fresh[1])
    warm = max(loss_gap(fresh[0], t) for t in worker[1:])
    print(
        f"training loss, largest relative step difference: fresh vs fresh {between:.2e}, "
        f"fresh vs warm (trials 2-5) {warm:.2e}"
    )
    print(
        "metrics: fresh "
        + ", ".join(str(t["metrics"]) for t in fresh)
        + " · warm "
        + ", ".join(str(t["metrics"]) for t in worker[1:])
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
