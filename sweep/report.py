"""`python -m sweep report --study NAME [--out DIR]`: what a study found, as plots and tables.

Writes report.md and report.html with every figure as PNG and interactive HTML into one folder
(default storage/reports/<study>/) and logs the folder to the study's MLflow parent run.
Everything is read from the Optuna storage, the trial folders and (for example generations)
a child process that loads the models: the sweep process itself never imports torch.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import optuna
from optuna.trial import TrialState

from sweep import figures, folders, trial_process
from sweep.checks import output_folder
from sweep.document import to_html, to_markdown
from sweep.errors import ConfigError
from sweep.plots import build_figures
from sweep.rows import curves, pruning_summary, ranked, trial_rows

TOP = 3  # best trials whose generations are shown
FANOVA = optuna.importance.FanovaImportanceEvaluator(seed=0)
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


def own_folders(study, rows: list[dict]) -> list[dict]:
    """The rows whose trial folder is the trial's own (sweep/folders.py)."""
    trials = study.get_trials(deepcopy=False)
    return [
        r
        for r in rows
        if r["trial_dir"] and not folders.mismatch(Path(r["trial_dir"]), trials[r["number"]], study)
    ]


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
    own = own_folders(study, rows)  # a folder another storage's trial overwrote is left out
    blocks += examples_blocks(example_generations(own, direction, examples, new_tokens, out_dir))
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
        f"final {metric}",
        "peak GiB (training)",
        "eval GiB",
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
            _fmt(r["final_metric"], "{:.4f}"),
            _fmt(r["peak_gib"], "{:.2f}"),
            _fmt(r["eval_peak_gib"], "{:.2f}"),
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
