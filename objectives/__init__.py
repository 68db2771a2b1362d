"""Task objectives by name. Each module exposes the same few names:

- METRIC, DIRECTION: the task metric optimised by the study and whether to maximize it;
- LOCAL_FILES: files a local data folder (layout of shared/data) must hold;
- IMPLEMENTED: False while the task only validates;
- load(data_dir, train_n, val_n, eval_n, seed, system_prompt) -> (train, val, evaluation)
  lists of examples: dicts with "messages" (chat turns before the answer) and "answer";
- evaluate(model, tokenizer, examples, batch_size) -> dict of metrics (runs in the trial).

No module imports torch at import time: the sweep process reads METRIC and DIRECTION.
"""

from __future__ import annotations

from objectives import alpacaeval, squad, sst2

OBJECTIVES = {"sst2": sst2, "squad": squad, "alpacaeval": alpacaeval}
