"""How often the local judge agrees with GPT-4-turbo's published preferences (docs/objectives.md).

python -m src.judge MODEL_DIR ANNOTATIONS.json.xz --n 40
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from objectives import judges, winrate
from src import models


def agreement(model_dir: Path, annotation_file: Path, n: int, seed: int) -> dict:
    """The local judge (objectives/judges.py) on `n` random pairs of a file against the
    file's own preferences: the share of decided pairs where both pick the same side."""
    rows = [r for r in winrate.read_annotations(annotation_file) if r.get("preference")]
    rows = random.Random(seed).sample(rows, min(n, len(rows)))
    model, tokenizer, _ = models.load_base(models.folder_spec(str(model_dir)), "auto", model_dir)
    ours = judges.local_judge(model, tokenizer, rows, batch_size=4)
    theirs = [float(r["preference"]) for r in rows]
    decided = [(a, b) for a, b in zip(ours, theirs, strict=True) if b != 1.5]
    same_side = sum((a > 1.5) == (b > 1.5) for a, b in decided)
    return {
        "n": len(rows),
        "agreement": same_side / len(decided),
        "judge_mean_preference": sum(ours) / len(ours),
        "judge_min": min(ours),
        "judge_max": max(ours),
        "reference_win_rate": 100 * sum(t - 1 for t in theirs) / len(theirs),
        "majority_baseline": max(sum(b > 1.5 for _, b in decided), sum(b < 1.5 for _, b in decided))
        / len(decided),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=agreement.__doc__)
    parser.add_argument("model", type=Path, help="a model folder (e.g. data/models/...)")
    parser.add_argument("annotations", type=Path)
    parser.add_argument("--n", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(json.dumps(agreement(args.model, args.annotations, args.n, args.seed)))
