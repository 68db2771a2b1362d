"""`python -m sweep status --study NAME`: one row per trial, as a rich table."""

from __future__ import annotations

import datetime
import time
from pathlib import Path

import optuna
from rich.console import Console
from rich.live import Live
from rich.table import Table

from sweep import live, rows
from sweep.errors import ConfigError

STATE_STYLE = {"COMPLETE": "green", "PRUNED": "yellow", "FAIL": "red", "RUNNING": "cyan"}


def load(study_name: str, storage) -> optuna.Study:
    try:
        return optuna.load_study(study_name=study_name, storage=storage, sampler=None)
    except KeyError:
        raise ConfigError(
            f"no study {study_name!r} in this storage yet (run it first)", "--study"
        ) from None


def running_rows(study: optuna.Study) -> list[dict]:
    """The live rows the sweep wrote onto its running trials (sweep/live.py), elapsed time
    counted from each trial's start; a trial that wrote none yet shows as starting."""
    out = []
    now = datetime.datetime.now()
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        row = dict(t.user_attrs.get(live.LIVE) or {})
        if not row:
            row = {"number": t.number, "phase": "starting", "step": 0, "max_steps": "?"}
            row |= {k: t.params.get(k) for k in ("model", "r", "lr")}
        if t.datetime_start:
            row["elapsed_s"] = (now - t.datetime_start).total_seconds()
        out.append(row)
    return out


def watch(study_name: str, storage, every_s: float = 2.0) -> None:
    """The sweep's live table from the storage, until Ctrl-C (`status --watch`)."""
    console = Console()

    def draw() -> tuple[dict, list[dict]]:
        study = load(study_name, storage)
        return live.header(study, study.user_attrs.get("planned")), running_rows(study)

    if not console.is_terminal:  # one snapshot per interval, as lines
        try:
            while True:
                head, rows_now = draw()
                console.print(live.render(head, rows_now), soft_wrap=True)
                time.sleep(every_s)
        except KeyboardInterrupt:
            return
    try:
        with Live(live.render(*draw()), console=console, auto_refresh=False) as view:
            while True:
                time.sleep(every_s)
                view.update(live.render(*draw()), refresh=True)
    except KeyboardInterrupt:
        return


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
    placed = any("gpu" in tr.user_attrs for tr in study.trials)
    hosts = {tr.user_attrs.get("host") for tr in study.trials} - {None}
    where = placed or len(hosts) > 1
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
        "eval GiB",
        "tokens/s",
        "trainable %",
        "val loss",
        "duration",
        *(["where"] if where else []),
    ):
        left = col in ("state", "method", "model", "where")
        t.add_column(col, justify="left" if left else "right")
    for trial in study.trials:
        t.add_row(*row(trial), *([where_ran(trial)] if where else []))
    folders = [tr.user_attrs["trial_dir"] for tr in study.trials if "trial_dir" in tr.user_attrs]
    notes = []
    if "eval_set" in study.user_attrs:
        notes.append(f"{metric} measured on: {study.user_attrs['eval_set']}")
    if folders:
        notes.append(f"adapters, configs, results, logs: {Path(folders[0]).parent}/<#>/")
    line = concurrency_line(study.trials)
    if line:
        notes.append(line)
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
    eval_peak = a.get("eval_peak_memory_gib")
    eval_peak = "" if eval_peak is None else f"{eval_peak:.2f}"
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
        eval_peak,
        _fmt(a.get("train_tokens_per_s"), "{:,.0f}"),
        _fmt(a.get("trainable_pct"), "{:.2f}"),
        _fmt(a.get("last_val_loss"), "{:.4f}"),
        _fmt(duration, "{:.0f} s"),
    ]


def _fmt(value, pattern: str) -> str:
    return "" if value is None else pattern.format(value)


def where_ran(trial: optuna.trial.FrozenTrial) -> str:
    host, gpu = trial.user_attrs.get("host", ""), trial.user_attrs.get("gpu")
    return host + ("" if gpu is None else f":gpu{gpu}")


BARS = " ▁▂▃▄▅▆▇█"


def concurrency(trials, buckets: int = 40) -> tuple[int, float, list[int]] | None:
    """(most trials running at once, mean while any ran, running count per time bucket)."""
    now = datetime.datetime.now()
    spans = [(t.datetime_start, t.datetime_complete or now) for t in trials if t.datetime_start]
    if len(spans) < 2:
        return None
    edges = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    running = most = 0
    for _, step in edges:
        running += step
        most = max(most, running)
    begin, end = min(s for s, _ in spans), max(e for _, e in spans)
    width = (end - begin) / buckets
    if not width:
        return None
    counts = []
    for i in range(buckets):
        middle = begin + width * (i + 0.5)
        counts.append(sum(s <= middle < e for s, e in spans))
    busy = [c for c in counts if c]
    return most, (sum(busy) / len(busy) if busy else 0.0), counts


def concurrency_line(trials) -> str:
    found = concurrency(trials)
    if found is None or found[0] < 2:
        return ""
    most, mean, counts = found
    bars = "".join(BARS[min(len(BARS) - 1, round(c * (len(BARS) - 1) / most))] for c in counts)
    return f"concurrency: up to {most} trials at once, {mean:.1f} on average; over time |{bars}|"
