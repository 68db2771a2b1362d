"""Task objectives by name. Each module exposes the same few names:

- METRIC, DIRECTION: the task metric optimised by the study and whether to maximize it;
- LOCAL_FILES: files a local data folder (layout of shared/data) must hold;
- eval_set(data_dir) -> str: what the metric is measured on, in words (status, MLflow);
- load(data_dir, train_n, val_n, eval_n, seed, system_prompt, train_set) -> (train, val,
  evaluation) lists of examples: dicts with "messages" (chat turns before the answer) and
  "answer", plus what evaluation needs (labels, gold answers, references);
- preflight(data_dir, judge) -> (problem, key) or None: what evaluation will need after a
  trial's training, checked before the first trial (the key relative to the study's table);
- evaluate(model, tokenizer, examples, settings, out_dir) -> dict of metrics (runs in the
  trial; `settings` is the [eval] table plus data/cache folders; files it writes in out_dir,
  such as predictions, are kept with the trial and logged to MLflow).

No module imports torch at import time: the sweep process reads METRIC and DIRECTION.
"""

from __future__ import annotations

from pathlib import Path

from objectives import alpacaeval, squad, sst2

OBJECTIVES = {"sst2": sst2, "squad": squad, "alpacaeval": alpacaeval}


def evaluation_rows(spec: dict, max_examples: int) -> list[dict]:
    """The evaluation rows of a trial's spec.json (seeded subset; 0 = all), as it trained."""
    train = spec["train"]
    data_dir = Path(spec["data_dir"]) if spec["data_dir"] else None
    return OBJECTIVES[spec["task"]].load(
        data_dir, 1, 1, max_examples, train["seed"], train["system_prompt"], spec.get("train_set")
    )[2]
