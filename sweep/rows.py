"""A study's trials as plain rows (dicts): what `best`, `report` and its plots are made of."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
from optuna.trial import TrialState

from sweep import final


def is_infeasible(t: optuna.trial.FrozenTrial) -> bool:
    """COMPLETE but over the memory budget or out of memory (constraint > 0)."""
    return t.state == TrialState.COMPLETE and any(v > 0 for v in t.constraints.values())


def method(t: optuna.trial.FrozenTrial) -> str:
    """Searched (a param) or fixed (a user attribute); studies from before methods: qlora."""
    return t.params.get("method", t.user_attrs.get("method", "qlora"))


def learning_rate(t: optuna.trial.FrozenTrial) -> float | None:
    """LoRA's lr or full fine-tuning's lr_full, searched or fixed."""
    p, a = t.params, t.user_attrs
    return p.get("lr", p.get("lr_full", a.get("lr", a.get("lr_full"))))


def unspent_tokens(row: dict) -> float:
    """The tokens a pruned trial did not train: its remaining steps at its own tokens/step."""
    if row["state"] == "pruned" and row["steps"] and row["max_steps"]:
        return (row["max_steps"] - row["steps"]) * row["train_tokens"] / row["steps"]
    return 0.0


def trial_rows(study: optuna.Study) -> list[dict]:
    """One dict per trial: what the tables and plots are drawn from."""
    rows = []
    finals = final.results(study)
    metric = study.metric_names[0] if study.metric_names else None
    for t in study.get_trials(deepcopy=False):
        p, a = t.params, t.user_attrs
        infeasible = is_infeasible(t)
        state = "infeasible" if infeasible else t.state.name.lower()
        rows.append(
            {
                "number": t.number,
                "state": state,
                "method": method(t),
                "model": p.get("model", ""),
                "r": p.get("r"),
                "lr": learning_rate(t),
                "metric": t.values[0] if t.values and not infeasible else None,
                "peak_gib": a.get("peak_memory_gib"),
                "eval_peak_gib": a.get("eval_peak_memory_gib"),
                # `sweep final`: the metric on the whole evaluation set
                "final_metric": finals.get(t.number, {}).get("metrics", {}).get(metric),
                "tokens_per_s": a.get("train_tokens_per_s"),
                "trainable": a.get("trainable_params"),
                "trainable_pct": a.get("trainable_pct"),
                "train_tokens": a.get("train_tokens") or 0,
                "steps": a.get("steps") or 0,
                "max_steps": _max_steps(a.get("trial_dir")),
                "trial_dir": a.get("trial_dir"),
                "start": t.datetime_start,
                "end": t.datetime_complete,
            }
        )
    return rows


def _max_steps(trial_dir: str | None) -> int | None:
    spec = Path(trial_dir or "/nonexistent") / "spec.json"
    return json.loads(spec.read_text())["train"]["max_steps"] if spec.is_file() else None


def label(row: dict) -> str:
    rank = f" r{row['r']}" if row["r"] else ""
    return f"#{row['number']} {row['model']} {row['method']}{rank}"


def pruning_summary(rows: list[dict]) -> dict:
    """Training tokens spent, and saved by stopping pruned trials before their last step."""
    spent = sum(r["train_tokens"] for r in rows)
    saved = sum(unspent_tokens(r) for r in rows)
    counts = {s: sum(r["state"] == s for r in rows) for s in ("complete", "pruned", "fail")}
    counts["infeasible"] = sum(r["state"] == "infeasible" for r in rows)
    return {"tokens_spent": spent, "tokens_saved_estimate": int(saved), **counts}


def curves(companion: optuna.Study | None) -> dict[int, dict[int, float]]:
    """Validation loss per step of every trial, from the pruner's mirror trials."""
    if companion is None:
        return {}
    out = {}
    for mirror in companion.get_trials(deepcopy=False):
        number = mirror.user_attrs.get("trial_number")
        if number is not None and mirror.intermediate_values:
            out[number] = dict(sorted(mirror.intermediate_values.items()))
    return out


def ranked(rows: list[dict], direction: str) -> list[dict]:
    done = [r for r in rows if r["metric"] is not None]
    return sorted(done, key=lambda r: r["metric"], reverse=direction == "maximize")
