"""`python -m sweep status --study NAME`: one row per trial, as a rich table."""

from __future__ import annotations

from pathlib import Path

import optuna
from rich.console import Console
from rich.table import Table

from sweep import rows
from sweep.errors import ConfigError

STATE_STYLE = {"COMPLETE": "green", "PRUNED": "yellow", "FAIL": "red", "RUNNING": "cyan"}


def load(study_name: str, storage) -> optuna.Study:
    try:
        return optuna.load_study(study_name=study_name, storage=storage, sampler=None)
    except KeyError:
        raise ConfigError(
            f"no study {study_name!r} in this storage yet (run it first)", "--study"
        ) from None


def show(study: optuna.Study) -> None:
    console = Console()
    if not console.is_terminal:  # piped or redirected: keep rows whole instead of 80 columns
        console = Console(width=200)
    console.print(table(study))


def table(study: optuna.Study) -> Table:
    metric = study.user_attrs.get("metric", "metric")
    title = f"study {study.study_name} · task {study.user_attrs.get('task')}"
    if study.user_attrs.get("vram_budget_gb"):
        title += f" · memory budget {study.user_attrs['vram_budget_gb']:g} GiB"
    t = Table(title=title)
    for col in (
        "#",
        "state",
        "method",
        "model",
        "r",
        "alpha",
        "lr",
        "dropout",
        metric,
        "peak GiB",
        "tokens/s",
        "trainable %",
        "val loss",
        "duration",
    ):
        t.add_column(col, justify="left" if col in ("state", "method", "model") else "right")
    for trial in study.trials:
        t.add_row(*row(trial))
    folders = [tr.user_attrs["trial_dir"] for tr in study.trials if "trial_dir" in tr.user_attrs]
    notes = []
    if "eval_set" in study.user_attrs:
        notes.append(f"{metric} measured on: {study.user_attrs['eval_set']}")
    if folders:
        notes.append(f"adapters, configs, results, logs: {Path(folders[0]).parent}/<#>/")
    fallbacks = [tr.number for tr in study.trials if "objective_fallback" in tr.user_attrs]
    if fallbacks:
        notes.append(f"trials {fallbacks}: judge unreachable, value = -validation loss")
    t.caption = "\n".join(notes) or None
    return t


def row(trial: optuna.trial.FrozenTrial) -> list[str]:
    p, a = trial.params, trial.user_attrs
    state = trial.state.name
    label = state.lower()
    if rows.is_infeasible(trial):
        label = f"infeasible ({a.get('reason') or 'constraint'})"
    elif state == "FAIL" and a.get("reason"):
        label = f"fail ({a['reason']})"
    peak = "" if a.get("peak_memory_gib") is None else f"{a['peak_memory_gib']:.2f}"
    if peak and a.get("memory_kind") == "cpu_rss":
        peak += " RSS"
    duration = trial.duration.total_seconds() if trial.duration else None
    lr = rows.learning_rate(trial)
    dropout = p.get("dropout", a.get("dropout"))
    alpha = p["r"] * p["alpha_multiple"] if "r" in p and "alpha_multiple" in p else None
    return [
        str(trial.number),
        f"[{STATE_STYLE.get(state, 'white')}]{label}[/]",
        rows.method(trial),
        str(p.get("model", "")),
        _fmt(p.get("r"), "{}"),
        _fmt(alpha, "{:g}"),
        _fmt(lr, "{:.2e}"),
        _fmt(dropout, "{:.3f}"),
        _fmt(trial.values[0] if trial.values else None, "{:.4f}"),
        peak,
        _fmt(a.get("train_tokens_per_s"), "{:,.0f}"),
        _fmt(a.get("trainable_pct"), "{:.2f}"),
        _fmt(a.get("last_val_loss"), "{:.4f}"),
        _fmt(duration, "{:.0f} s"),
    ]


def _fmt(value, pattern: str) -> str:
    return "" if value is None else pattern.format(value)
