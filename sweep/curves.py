"""`python -m sweep curves`: a study's learning curves as one small table (JSON, xz), the
input of `sweep replay` (sweep/replay.py, docs/pruning.md).

    python -m sweep curves --study sst2-curves --storage sqlite:///A.db --storage ... \\
        --alone 0,1,2 --out docs/curves/sst2-smollm2.json.xz
    python -m sweep curves --study sst2-curves --storage sqlite:///A.db --top-params 10 --out P.json
    python -m sweep curves --study sst2-curves --storage sqlite:///C.db \
        --extend docs/curves/sst2-smollm2.json.xz --out docs/curves/sst2-smollm2.json.xz

Every finished trial of the study (from each storage: the same study run again with another
train.seed goes in a second storage) gives one run: its params, train.seed, the tokens and
train loss at every step, validation loss and accuracy at every validation, the final
metric and peak memory. Costs in seconds come from trials that ran alone on the card
(`--alone`, their numbers in the first storage): packed trials share the card, so their own
times are not one trial's. `--top-params K` writes the K best configurations' params instead
(for `sweep run --enqueue` with another seed). `--extend TABLE` adds the storages' runs to
a table written before (more configurations, drawn with another sampler seed, in a session
whose storage of the first ones is gone): the first storage's runs join its configurations,
the others its seed repeats; its cost model stays unless `--alone` measures a new one.
"""

from __future__ import annotations

import dataclasses
import json
import lzma
import statistics
import sys
from pathlib import Path

import optuna
from optuna.trial import TrialState

from sweep import folders
from sweep.errors import ConfigError
from sweep.results import TrialResult

TRAIN_KEYS = ("max_steps", "batch_size", "eval_every", "val_examples")


def runs(study: optuna.Study, root: Path) -> list[dict]:
    """One row per finished trial that kept its curve."""
    out = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        folder = folders.trial_folder(root, study, t.number)
        try:
            result = TrialResult.from_json((folder / "result.json").read_text())
            spec = json.loads((folder / "spec.json").read_text())
        except (OSError, ValueError):
            continue
        if not result.curve or not result.curve.get("train"):
            continue
        train = result.curve["train"]
        out.append(
            {
                "number": t.number,
                "seed": spec["train"]["seed"],
                "params": {k: v for k, v in t.params.items() if k not in ("model", "method")},
                "train_settings": {k: spec["train"][k] for k in TRAIN_KEYS},
                "final": t.values[0],
                "peak_gib": result.peak_memory_gib,
                "tokens": [row[1] for row in train],
                "train_loss": [round(row[2], 5) for row in train],
                "val": [[s, round(loss, 5), acc] for s, loss, acc in result.curve["val"]],
                "seconds": {
                    "wall": result.wall_seconds,
                    "train": result.phases.get("training", result.train_seconds),
                    "validation": result.phases.get("validation", 0.0),
                    "start": result.phases.get("load", 0.0) + result.phases.get("data", 0.0),
                    "finish": result.phases.get("saving", 0.0)
                    + result.phases.get("evaluation", 0.0),
                },
            }
        )
    return out


def cost_model(alone: list[dict]) -> dict:
    """Seconds of a trial from its tokens, medians over trials that ran alone: a training rate,
    seconds per validation, and fixed seconds to start (load, data) and finish (save, evaluate)."""
    if not alone:
        raise ConfigError("no finished trial among --alone", "--alone")
    return {
        "tokens_per_s": statistics.median(r["tokens"][-1] / r["seconds"]["train"] for r in alone),
        "validation_s": statistics.median(
            r["seconds"]["validation"] / max(len(r["val"]), 1) for r in alone
        ),
        "start_s": statistics.median(r["seconds"]["start"] for r in alone),
        "finish_s": statistics.median(r["seconds"]["finish"] for r in alone),
        "from_trials": [r["number"] for r in alone],
    }


def build(
    studies: list[optuna.Study], root: Path, alone: list[int], study_cfg, old: dict | None = None
) -> dict:
    """The table of `studies`' runs, or `old` with them added (`extend`)."""
    rows = []
    for k, study in enumerate(studies):
        for r in runs(study, root):
            rows.append(r | {"storage": k})
    if not rows:
        raise ConfigError("no finished trial with a learning curve in this study", "--study")
    first = [r for r in rows if r["storage"] == 0 and r["number"] in alone]
    train = rows[0].pop("train_settings")
    for r in rows[1:]:
        if r.pop("train_settings") != train:  # one table, one training budget
            raise ConfigError(f"trial {r['number']} trained with other settings", "--storage")
    table = {
        "study": study_cfg.name,
        "task": study_cfg.task,
        "metric": studies[0].user_attrs.get("metric", "accuracy"),
        "models": list(study_cfg.models),
        "space": dataclasses.asdict(study_cfg.space),
        "train": train,
        "cost": cost_model(first) if alone or old is None else None,
        "command": " ".join(["python -m sweep", *sys.argv[1:]]),
        "runs": rows,
    }
    return table if old is None else extend(old, table)


def extend(old: dict, new: dict) -> dict:
    """`old` with `new`'s runs: new's first storage joins old's configurations (storage 0),
    its other storages follow old's; a run of a configuration and train seed the table has
    already is left out. The same study, space and training settings, or one clear error."""
    for key in ("study", "task", "metric", "space", "train"):
        if old.get(key) != json.loads(json.dumps(new[key])):  # as written: lists, not tuples
            raise ConfigError(f"the table's {key} differs from this study's", "--extend")
    after = 1 + max(r.get("storage", 0) for r in old["runs"])
    seen = {(json.dumps(r["params"], sort_keys=True), r["seed"]) for r in old["runs"]}
    added = []
    for r in new["runs"]:
        key = (json.dumps(r["params"], sort_keys=True), r["seed"])
        if key in seen:
            continue
        seen.add(key)
        storage = 0 if r["storage"] == 0 else after + r["storage"] - 1
        added.append(r | {"storage": storage, "part": old.get("parts", 1)})
    return old | {
        "cost": new["cost"] or old["cost"],
        "command": f"{old['command']} && {new['command']}",
        "parts": old.get("parts", 1) + 1,  # runs of the table's first part have no "part"
        "runs": old["runs"] + added,
    }


def top_params(studies: list[optuna.Study], k: int, old: dict | None = None) -> list[dict]:
    """The K best configurations' params (for `sweep run --enqueue`): the first storage's
    finished trials, and the configurations of `old`, a table this storage will extend (one
    built over two sessions repeats the best of all its configurations, not of the last part)."""
    done = studies[0].get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    found = [(t.values[0], t.params) for t in done]
    if old is not None:
        if len(old["models"]) != 1:  # its runs do not say which model they trained
            raise ConfigError("the table has several models", "--extend")
        model = {"model": old["models"][0]}
        found += [(r["final"], r["params"] | model) for r in old["runs"] if not r.get("storage")]
    best, seen = [], set()
    for _, params in sorted(found, key=lambda f: -f[0]):
        key = json.dumps(params, sort_keys=True)
        if key not in seen and len(best) < k:
            seen.add(key)
            best.append(params)
    return best


def write(table: dict | list, out: Path) -> None:
    text = json.dumps(table, separators=(",", ":"))
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.name.endswith(".xz"):
        out.write_bytes(lzma.compress(text.encode()))
    else:
        out.write_text(text)


def read(path: Path) -> dict:
    """A table written by `write` (.json or .json.xz)."""
    data = path.read_bytes()
    try:
        table = json.loads(lzma.decompress(data) if path.name.endswith(".xz") else data)
    except lzma.LZMAError as err:
        raise ValueError(f"not xz: {err}") from None
    if not isinstance(table, dict) or not isinstance(table.get("runs"), list):
        raise ValueError("no runs in it")
    return table
