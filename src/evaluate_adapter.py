"""Score a trained adapter again, e.g. a demo trial on the whole dev set instead of its subset.

    python -m src.evaluate_adapter storage/trials/demo/2 --max-examples 0

Reads the trial's spec.json (model, task, data, prompt) and its adapter/ folder; prints JSON.
Files the objective writes (predictions, model outputs) go to <trial>/reevaluated/ (or
--out-folder; `sweep final` uses final/).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from objectives import OBJECTIVES, evaluation_rows
from src import models, speed
from src.train_qlora import eval_settings


def evaluate(trial_dir: Path, max_examples: int, folder: str = "reevaluated") -> dict:
    spec = json.loads((trial_dir / "spec.json").read_text())
    speed.attention_backends(spec["train"].get("cudnn_attention", False))  # as in its trial
    model, tokenizer = models.load_trained(trial_dir, spec)
    rows = evaluation_rows(spec, max_examples)
    out_dir = trial_dir / folder
    out_dir.mkdir(exist_ok=True)
    return OBJECTIVES[spec["task"]].evaluate(model, tokenizer, rows, eval_settings(spec), out_dir)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("trial_dir", type=Path)
    parser.add_argument("--max-examples", type=int, default=0, help="0 = the whole evaluation set")
    parser.add_argument("--out-folder", default="reevaluated", help="inside the trial folder")
    args = parser.parse_args()
    print(json.dumps(evaluate(args.trial_dir, args.max_examples, args.out_folder)))
