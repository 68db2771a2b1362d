"""`sweep best`: the Pareto-optimal trials; `sweep export`: one trial's adapter, ready to use.

python -m sweep best --study demo
python -m sweep export --study demo --trial 2 --out my-adapter
# then: PeftModel.from_pretrained(base_model, "my-adapter")
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import optuna
from rich.console import Console
from rich.table import Table

from sweep import final, folders
from sweep import rows as trial_rows
from sweep.checks import output_folder
from sweep.errors import ConfigError


def show(study: optuna.Study) -> None:
    rows = {r["number"]: r for r in trial_rows.trial_rows(study)}
    front = sorted(study.best_trials, key=lambda t: t.values[1])
    if not front:
        raise ConfigError(
            f"study {study.study_name!r} has no complete feasible trial yet", "--study"
        )
    metric = study.metric_names[0] if study.metric_names else "metric"
    finals = final.results(study)
    t = Table(title=f"study {study.study_name}: Pareto-optimal trials ({metric} vs peak memory)")
    final_col = f"final {metric}" if finals else None
    cols = ("#", "method", "model", "r", "lr", metric, *([final_col] if finals else []))
    for col in (*cols, "peak GiB", "trial folder"):
        t.add_column(col, justify="left" if col in ("method", "model", "trial folder") else "right")
    for trial in front:
        r = rows[trial.number]
        t.add_row(
            str(r["number"]),
            r["method"],
            r["model"],
            str(r["r"] or ""),
            f"{r['lr']:.2e}",
            f"{trial.values[0]:.4f}",
            *([_final_cell(finals.get(trial.number), metric)] if finals else []),
            f"{trial.values[1]:.2f}",
            r["trial_dir"] or "",
        )
    s = trial_rows.pruning_summary(list(rows.values()))
    t.caption = (
        f"{len(rows)} trials: {s['complete']} complete, {s['infeasible']} infeasible, "
        f"{s['pruned']} pruned, {s['fail']} failed · training tokens {s['tokens_spent']:,}"
        f" (pruner saved ~{s['tokens_saved_estimate']:,})"
    )
    if finals:
        t.caption += f" · final: {metric} on the whole evaluation set (sweep final)"
    Console(width=200).print(t)


def _final_cell(entry: dict | None, metric: str) -> str:
    """The final metric and how many rows it was measured on."""
    if not entry or entry["metrics"].get(metric) is None:
        return ""
    return f"{entry['metrics'][metric]:.4f} (n={entry.get('examples')})"


def export(study: optuna.Study, number: int, out: Path) -> Path:
    """Copy the trial's adapter (or fully fine-tuned model) with its config and metrics."""
    trials = study.get_trials(deepcopy=False)
    if not 0 <= number < len(trials):
        raise ConfigError(
            f"no trial {number} in study {study.study_name!r} (it has trials 0..{len(trials) - 1})",
            "--trial",
        )
    trial = trials[number]
    folder = Path(trial.user_attrs.get("trial_dir", "/nonexistent"))
    weights = next((folder / w for w in ("adapter", "model") if (folder / w).is_dir()), None)
    if weights is None:
        raise ConfigError(
            f"trial {number} is {trial.state.name.lower()} and saved no adapter", "--trial"
        )
    if problem := folders.mismatch(folder, trial, study):
        raise ConfigError(f"trial {number}'s folder is not its own: {problem}", "--trial")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out} exists and is not an empty folder", "--out")
    output_folder(out, "--out")
    shutil.copytree(weights, out, dirs_exist_ok=True)
    for name in ("config.json", "result.json"):
        if (folder / name).is_file():
            shutil.copy2(folder / name, out / f"sweep-{name}")
    summary = {
        "study": study.study_name,
        "trial": number,
        "params": trial.params,
        "values": dict(
            zip(
                study.metric_names or ["metric", "peak_memory_gib"],
                trial.values or [],
                strict=False,
            )
        ),
        "metrics": trial.user_attrs.get("metrics", {}),
        "kind": weights.name,  # adapter: PeftModel.from_pretrained; model: AutoModel...
    }
    (out / "sweep-trial.json").write_text(json.dumps(summary, indent=2))
    return out
