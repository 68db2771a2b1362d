"""`python -m sweep report --study NAME [--out DIR]`: what a study found, as plots and tables.

Writes report.md and report.html with every figure as PNG and interactive HTML into one folder
(default storage/reports/<study>/) and logs the folder to the study's MLflow parent run.
Everything is read from the Optuna storage, the trial folders and (for example generations)
a child process that loads the models: the sweep process itself never imports torch.
"""

from __future__ import annotations

import html
import json
import subprocess
import sys
from pathlib import Path

import optuna
from optuna.trial import TrialState

from sweep import figures, trial_process
from sweep.checks import output_folder
from sweep.errors import ConfigError
from sweep.figures import Figure, Series

TOP = 3  # best trials whose curves and generations are shown
FANOVA = optuna.importance.FanovaImportanceEvaluator(seed=0)


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


def build_figures(study, rows, loss_curves, budget, metric, direction) -> list[Figure]:
    done = [r for r in rows if r["metric"] is not None]
    front = {t.number for t in study.best_trials}
    figs = [pareto_figure(rows, front, budget, metric)]
    lora = [r for r in done if r["r"]]
    models = sorted({r["model"] for r in lora})
    figs.append(
        Figure(
            "rank",
            f"{metric} vs LoRA rank",
            "LoRA rank r",
            metric,
            [
                _points(m, [r for r in lora if r["model"] == m], "r", "metric", "lines+markers")
                for m in models
            ],
            xlog=True,
        )
    )
    methods = sorted({r["method"] for r in done})
    figs.append(
        Figure(
            "learning-rate",
            f"{metric} vs learning rate",
            "learning rate",
            metric,
            [_points(m, [r for r in done if r["method"] == m], "lr", "metric") for m in methods],
            xlog=True,
        )
    )
    figs.append(scaling_figure(done, metric, direction))
    best = ranked(rows, direction)[:TOP]
    figs.append(
        _curve_figure(
            "curves-best", f"validation loss of the {len(best)} best trials", best, loss_curves
        )
    )
    per_method = [ranked([r for r in rows if r["method"] == m], direction)[:1] for m in methods]
    figs.append(
        _curve_figure(
            "curves-methods",
            "validation loss: best trial of each method",
            [b[0] for b in per_method if b],
            loss_curves,
        )
    )
    figs.append(tokens_figure(rows))
    measured = [r for r in rows if r["tokens_per_s"]]
    figs.append(
        Figure(
            "throughput",
            "training throughput per trial",
            "trial",
            "tokens/s",
            [
                Series(
                    "tokens/s",
                    [label(r) for r in measured],
                    [r["tokens_per_s"] for r in measured],
                    [f"{r['trainable_pct']:.2f}% trainable" for r in measured],
                    mode="bar",
                )
            ],
            xcategories=True,
        )
    )
    return figs


def pareto_figure(rows: list[dict], front: set[int], budget: float, metric: str) -> Figure:
    on = sorted((r for r in rows if r["number"] in front), key=lambda r: r["peak_gib"])
    off = [r for r in rows if r["metric"] is not None and r["number"] not in front]
    bad = [r for r in rows if r["state"] == "infeasible" and r["peak_gib"] is not None]
    series = [
        _points("Pareto front", on, "peak_gib", "metric", "lines+markers", emphasis=True),
        _points("other trials", off, "peak_gib", "metric"),
        Series(
            "infeasible (metric 0)",
            [r["peak_gib"] for r in bad],
            [0.0] * len(bad),
            [label(r) for r in bad],
            faded=True,
        ),
    ]
    vline = (budget, f"budget {budget:g} GiB") if budget else None
    return Figure(
        "pareto",
        f"{metric} vs peak memory",
        "peak memory (GiB)",
        metric,
        [s for s in series if s.x],
        vline=vline,
    )


def scaling_figure(done: list[dict], metric: str, direction: str) -> Figure:
    """Best trial of each base model: its metric against its peak memory, smallest first."""
    best = [
        ranked([r for r in done if r["model"] == m], direction)[0]
        for m in {r["model"] for r in done}
    ]
    best.sort(key=lambda r: r["peak_gib"] or 0)
    return Figure(
        "scaling",
        f"best {metric} per model vs its peak memory",
        "peak memory (GiB)",
        metric,
        [_points("best trial per model", best, "peak_gib", "metric", "lines+markers")],
    )


def tokens_figure(rows: list[dict]) -> Figure:
    """Cumulative training tokens, as run and as they would have been without pruning."""
    spent, full, x = [], [], []
    total_spent = total_full = 0
    for r in rows:
        total_spent += r["train_tokens"]
        extra = 0
        if r["state"] == "pruned" and r["steps"] and r["max_steps"]:
            extra = (r["max_steps"] - r["steps"]) * r["train_tokens"] / r["steps"]
        total_full += r["train_tokens"] + extra
        x.append(r["number"])
        spent.append(total_spent)
        full.append(total_full)
    return Figure(
        "tokens",
        "training tokens: spent vs without pruning (estimate)",
        "trial",
        "cumulative training tokens",
        [
            Series("spent", x, spent, mode="lines+markers", emphasis=True),
            Series("without pruning (estimate)", x, full, mode="lines", faded=True),
        ],
    )


def _curve_figure(name: str, title: str, chosen: list[dict], loss_curves: dict) -> Figure:
    series = []
    for r in chosen:
        curve = loss_curves.get(r["number"], {})
        if curve:
            series.append(Series(label(r), list(curve), list(curve.values()), mode="lines+markers"))
    return Figure(name, title, "training step", "validation loss", series)


def _points(name, rows, x, y, mode="markers", emphasis=False) -> Series:
    return Series(
        name,
        [r[x] for r in rows],
        [r[y] for r in rows],
        [label(r) for r in rows],
        mode=mode,
        emphasis=emphasis,
    )


MIN_IMPORTANCE_TRIALS = 4  # fewer: any split of the trials "explains" the metric


def importances(study: optuna.Study) -> dict[str, float] | str:
    """fANOVA importances of the parameters for the metric, or why there are none."""
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(done) < MIN_IMPORTANCE_TRIALS:
        return f"needs {MIN_IMPORTANCE_TRIALS} complete trials, has {len(done)}"
    try:
        return optuna.importance.get_param_importances(
            study, evaluator=FANOVA, target=lambda t: t.values[0]
        )
    except (ValueError, RuntimeError) as err:
        return str(err).split("\n")[0]


def example_generations(rows, direction, n: int, max_new_tokens: int, out_dir: Path) -> dict:
    """The best trials' answers next to their base model's, from a child process."""
    best = [r for r in ranked(rows, direction) if r["trial_dir"]][:TOP]
    if not best or n <= 0:
        return {}
    request = out_dir / "examples-request.json"
    trials = [{"number": r["number"], "dir": r["trial_dir"]} for r in best]
    request.write_text(json.dumps({"trials": trials, "n": n, "max_new_tokens": max_new_tokens}))
    out = out_dir / "examples.json"
    proc = subprocess.run(
        [sys.executable, "-m", "src.examples", str(request), str(out)],
        cwd=trial_process.PROJECT_ROOT,
        capture_output=True,
        text=True,
    )
    request.unlink()
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "?"}
    return json.loads(out.read_text())


def write(study, companion, out_dir: Path, budget: float, examples: int, new_tokens: int):
    """Every figure and table into `out_dir`; returns the report's Markdown path."""
    rows = trial_rows(study)
    if not any(r["state"] != "running" for r in rows):
        raise ConfigError(f"study {study.study_name!r} has no finished trial yet", "--study")
    output_folder(out_dir, "--out")
    metric = study.user_attrs.get("metric", "metric")
    direction = study.directions[0].name.lower()
    loss_curves = curves(companion)
    blocks = summary_blocks(study, rows, budget, metric)
    for fig in build_figures(study, rows, loss_curves, budget, metric, direction):
        if fig.series:
            figures.save(fig, out_dir)
            blocks.append(("figure", fig.name, fig.title))
    blocks += optuna_blocks(study, out_dir)
    blocks += table_blocks(rows, metric)
    blocks += examples_blocks(example_generations(rows, direction, examples, new_tokens, out_dir))
    (out_dir / "report.md").write_text(to_markdown(blocks))
    (out_dir / "report.html").write_text(to_html(blocks, f"study {study.study_name}"))
    return out_dir / "report.md"


def summary_blocks(study, rows, budget, metric) -> list:
    s = pruning_summary(rows)
    a = study.user_attrs
    limit = f"{budget:g} GiB" if budget else "none"
    intro = (
        f"Task {a.get('task')}, {metric} measured on {a.get('eval_set', '?')}. "
        f"{len(rows)} trials: {s['complete']} complete, {s['infeasible']} infeasible, "
        f"{s['pruned']} pruned, {s['fail']} failed. Memory budget {limit}."
    )
    pruning = (
        f"Training tokens spent: {s['tokens_spent']:,}; the pruner saved about "
        f"{s['tokens_saved_estimate']:,} (pruned trials' remaining steps at their own "
        "tokens per step)."
    )
    front = sorted(study.best_trials, key=lambda t: t.values[1])
    by_number = {r["number"]: r for r in rows}
    table = [
        [
            str(t.number),
            by_number[t.number]["method"],
            by_number[t.number]["model"],
            str(by_number[t.number]["r"] or ""),
            f"{t.values[0]:.4f}",
            f"{t.values[1]:.2f}",
        ]
        for t in front
    ]
    return [
        ("h1", f"Study {study.study_name}"),
        ("p", intro),
        ("p", pruning),
        ("h2", "Pareto front: best metric for its memory (feasible trials)"),
        ("table", ["#", "method", "model", "r", metric, "peak GiB"], table),
    ]


def optuna_blocks(study: optuna.Study, out_dir: Path) -> list:
    import optuna.visualization as vis
    import optuna.visualization.matplotlib as vis_mpl

    blocks = []
    found = importances(study)
    if isinstance(found, dict) and found:
        target = {"target": lambda t: t.values[0], "target_name": study.metric_names[0]}
        with _quiet():
            figures.save_optuna(
                "importances",
                out_dir,
                vis.plot_param_importances(study, evaluator=FANOVA, **target),
                vis_mpl.plot_param_importances(study, evaluator=FANOVA, **target),
            )
        blocks.append(("figure", "importances", "parameter importances (fANOVA) for the metric"))
    else:
        blocks.append(("p", f"Parameter importances: not computed ({found or 'no parameters'})."))
    with _quiet():
        figures.save_optuna(
            "timeline", out_dir, vis.plot_timeline(study), vis_mpl.plot_timeline(study)
        )
    blocks.append(("figure", "timeline", "trials over time: complete, pruned, failed"))
    return blocks


def table_blocks(rows: list[dict], metric: str) -> list:
    header = [
        "#",
        "state",
        "method",
        "model",
        "r",
        "lr",
        metric,
        "peak GiB",
        "tokens/s",
        "trainable params",
        "trainable %",
        "train tokens",
        "steps",
    ]
    table = [
        [
            str(r["number"]),
            r["state"],
            r["method"],
            r["model"],
            _fmt(r["r"], "{}"),
            _fmt(r["lr"], "{:.2e}"),
            _fmt(r["metric"], "{:.4f}"),
            _fmt(r["peak_gib"], "{:.2f}"),
            _fmt(r["tokens_per_s"], "{:,.0f}"),
            _fmt(r["trainable"], "{:,}"),
            _fmt(r["trainable_pct"], "{:.2f}"),
            f"{r['train_tokens']:,}",
            str(r["steps"]),
        ]
        for r in rows
    ]
    return [("h2", "All trials"), ("table", header, table)]


def examples_blocks(table: dict) -> list:
    if not table:
        return []
    if "error" in table:
        return [("h2", "Example generations"), ("p", f"not generated: {table['error']}")]
    numbers = list(table["answers"])
    header = [
        "prompt",
        "reference",
        *[f"base {m}" for m in table["base"]],
        *[f"trial {n}" for n in numbers],
    ]
    rows = []
    for i, prompt in enumerate(table["prompts"]):
        rows.append(
            [
                _short(prompt, 300),
                _short(table["reference"][i], 200),
                *[_short(b[i], 200) for b in table["base"].values()],
                *[_short(table["answers"][n][i], 200) for n in numbers],
            ]
        )
    return [
        ("h2", "Example generations (greedy): base model vs the best trials"),
        ("p", "On a CPU the base runs unquantized here (4-bit generation is slow there)."),
        ("table", header, rows),
    ]


def to_markdown(blocks: list) -> str:
    out = []
    for kind, *rest in blocks:
        if kind in ("h1", "h2"):
            out.append(f"{'#' * int(kind[1])} {rest[0]}\n")
        elif kind == "p":
            out.append(f"{rest[0]}\n")
        elif kind == "figure":
            name, title = rest
            out.append(f"![{title}]({name}.png)\n\n[{title} (interactive)]({name}.html)\n")
        elif kind == "table":
            header, rows = rest
            cell = lambda v: str(v).replace("|", "\\|").replace("\n", " ")  # noqa: E731
            lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
            out.append("\n".join(lines) + "\n")
    return "\n".join(out)


def to_html(blocks: list, title: str) -> str:
    esc = html.escape
    out = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}"
        "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;"
        "padding:3px 6px;vertical-align:top}img{max-width:100%}</style></head><body>",
    ]
    for kind, *rest in blocks:
        if kind in ("h1", "h2"):
            out.append(f"<{kind}>{esc(rest[0])}</{kind}>")
        elif kind == "p":
            out.append(f"<p>{esc(rest[0])}</p>")
        elif kind == "figure":
            name, caption = rest
            out.append(
                f"<figure><a href='{name}.html'><img src='{name}.png' alt='{esc(caption)}'>"
                f"</a><figcaption>{esc(caption)} (click: interactive)</figcaption></figure>"
            )
        elif kind == "table":
            header, rows = rest
            out.append("<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>")
            out += [
                "<tr>" + "".join(f"<td>{esc(str(v))}</td>" for v in row) + "</tr>" for row in rows
            ]
            out.append("</table>")
    return "\n".join(out) + "</body></html>\n"


def _fmt(value, pattern: str) -> str:
    return "" if value is None else pattern.format(value)


def _short(text: str, limit: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


class _quiet:
    """Optuna marks its matplotlib plots experimental; the report is not the place to say so."""

    def __enter__(self):
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)
