"""What the report plots, as `figures.Figure` data: Pareto front, rank, learning rate, scaling,
validation-loss curves, training tokens, throughput."""

from __future__ import annotations

from sweep.figures import Figure, Series
from sweep.rows import label, ranked, unspent_tokens

TOP = 3  # best trials whose curves are shown


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
        total_full += r["train_tokens"] + unspent_tokens(r)
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
