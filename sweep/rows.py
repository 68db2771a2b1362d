"""A study's trials as plain rows (dicts): what `best`, `report` and its plots are made of."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
from optuna.trial import TrialState


def trial_rows(study: optuna.Study) -> list[dict]:
    """One dict per trial: what the tables and plots are drawn from."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        p, a = t.params, t.user_attrs
        infeasible = t.state == TrialState.COMPLETE and any(v > 0 for v in t.constraints.values())
        state = "infeasible" if infeasible else t.state.name.lower()
        rows.append(
            {
                "number": t.number,
                "state": state,
                "method": p.get("method", a.get("method", "qlora")),
                "model": p.get("model", ""),
                "r": p.get("r"),
                "lr": p.get("lr", p.get("lr_full", a.get("lr", a.get("lr_full")))),
                "metric": t.values[0] if t.values and not infeasible else None,
                "peak_gib": a.get("peak_memory_gib"),
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
    saved = 0
    for r in rows:
        if r["state"] == "pruned" and r["steps"] and r["max_steps"]:
            saved += (r["max_steps"] - r["steps"]) * r["train_tokens"] / r["steps"]
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
