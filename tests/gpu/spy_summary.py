"""Where a trial's time goes, from py-spy's raw output (docs/bench/README.md, "py-spy").

    py-spy record --subprocesses --rate 250 --format raw -o spy.txt -- python -m sweep bench \\
        --overhead --config tests/gpu/sweep-gpu.toml --study gpu-sst2 --steps 100
    python tests/gpu/spy_summary.py spy.txt [ROOT_FUNCTION] [ROWS]

Prints, for the trial process's samples under ROOT_FUNCTION (default the HF Trainer's
training loop), each function's inclusive share, then the leaf frames (where the time is
spent, native code counted at its Python caller).
"""

from __future__ import annotations

import collections
import gzip
import re
import sys


def summary(path: str, root: str = "_inner_training_loop", rows: int = 45) -> str:
    opener = gzip.open if path.endswith(".gz") else open
    inclusive, leaf, total = collections.Counter(), collections.Counter(), 0
    with opener(path, "rt") as lines:
        for line in lines:
            stack, count = line.rsplit(" ", 1)
            if "train_qlora" not in stack:
                continue
            names = [re.sub(r" \((.*?):\d+\)", r" (\1)", f) for f in stack.split(";")[2:]]
            start = next((i for i, name in enumerate(names) if root in name), None)
            if start is None:
                continue
            total += int(count)
            for name in set(names[start:]):
                inclusive[name] += int(count)
            leaf[names[-1]] += int(count)
    out = [f"samples under {root}: {total}"]
    out += [f"{100 * n / total:5.1f}% {f[:150]}" for f, n in inclusive.most_common(rows)]
    out += ["--- leaf frames"]
    out += [f"{100 * n / total:5.1f}% {f[:150]}" for f, n in leaf.most_common(30)]
    return "\n".join(out)


if __name__ == "__main__":
    print(summary(sys.argv[1], *sys.argv[2:3], *(int(a) for a in sys.argv[3:4])))
