"""A figure as data, drawn twice: a PNG with matplotlib and an interactive HTML with plotly.

The report's own plots (labelled Pareto front with the budget line, rank and learning-rate
sweeps, scaling, curves) are described once as a `Figure` and rendered by both libraries, so
the PNG a person looks at and the HTML they hover over show the same thing. Optuna's own
plots (importances, timeline) come from optuna.visualization and its matplotlib twin.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import plotly.graph_objects as go  # noqa: E402

MARKERS = "os^Dv<>p*h"


@dataclasses.dataclass
class Series:
    name: str
    x: list
    y: list
    labels: list[str] | None = None  # written next to each point (PNG) / on hover (HTML)
    mode: str = "markers"  # markers, lines, lines+markers, bar
    emphasis: bool = False  # drawn larger, on top (e.g. the Pareto front)
    faded: bool = False  # drawn small and grey (e.g. infeasible trials)


@dataclasses.dataclass
class Figure:
    name: str  # file stem
    title: str
    xlabel: str
    ylabel: str
    series: list[Series]
    vline: tuple[float, str] | None = None  # (x, label), e.g. the memory budget
    xlog: bool = False
    xcategories: bool = False  # bar charts: x values are names


def save(fig: Figure, folder: Path) -> tuple[Path, Path]:
    """Write `<name>.png` and `<name>.html` (plotly.js once, as plotly.min.js beside it)."""
    png, html = folder / f"{fig.name}.png", folder / f"{fig.name}.html"
    _png(fig, png)
    _plotly(fig).write_html(html, include_plotlyjs="directory", full_html=True)
    return png, html


def save_optuna(name: str, folder: Path, plotly_fig, matplotlib_ax) -> tuple[Path, Path]:
    """One of Optuna's own plots, from its plotly and matplotlib functions."""
    png, html = folder / f"{name}.png", folder / f"{name}.html"
    figure = matplotlib_ax.figure if hasattr(matplotlib_ax, "figure") else matplotlib_ax
    figure.set_size_inches(8, 5)
    figure.tight_layout()
    figure.savefig(png, dpi=110)
    plt.close(figure)
    plotly_fig.write_html(html, include_plotlyjs="directory", full_html=True)
    return png, html


def _png(fig: Figure, path: Path) -> None:
    f, ax = plt.subplots(figsize=(8, 5))
    bars = [s for s in fig.series if s.mode == "bar"]
    width = 0.8 / max(len(bars), 1)
    for i, s in enumerate(fig.series):
        color = "0.65" if s.faded else None
        if s.mode == "bar":
            pos = [k + (i - (len(bars) - 1) / 2) * width for k in range(len(s.x))]
            ax.bar(pos, s.y, width=width, label=s.name)
            ax.set_xticks(range(len(s.x)), [str(v) for v in s.x], rotation=30, ha="right")
            continue
        style = {
            "marker": MARKERS[i % len(MARKERS)] if "markers" in s.mode else None,
            "linestyle": "-" if "lines" in s.mode else "none",
            "markersize": 10 if s.emphasis else (5 if s.faded else 7),
            "zorder": 3 if s.emphasis else 2,
            "color": color,
        }
        ax.plot(s.x, s.y, label=s.name, **style)
        for x, y, text in zip(s.x, s.y, s.labels or [], strict=False):
            ax.annotate(text, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if fig.vline:
        ax.axvline(fig.vline[0], color="tab:red", linestyle="--", label=fig.vline[1])
    if fig.xlog:  # ranks (integers) on a base-2 axis with plain numbers, rates on base 10
        ranks = all(float(v).is_integer() for s in fig.series for v in s.x)
        ax.set_xscale("log", base=2 if ranks else 10)
        if ranks:
            ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set(title=fig.title, xlabel=fig.xlabel, ylabel=fig.ylabel)
    ax.grid(alpha=0.3)
    if len(fig.series) > 1 or fig.vline:
        ax.legend(fontsize=8)
    f.tight_layout()
    f.savefig(path, dpi=110)
    plt.close(f)


def _plotly(fig: Figure) -> go.Figure:
    out = go.Figure()
    for s in fig.series:
        if s.mode == "bar":
            out.add_trace(go.Bar(x=[str(v) for v in s.x], y=s.y, name=s.name, text=s.labels))
            continue
        marker = {"size": 14 if s.emphasis else (7 if s.faded else 10)}
        if s.faded:
            marker["color"] = "lightgrey"
        out.add_trace(
            go.Scatter(
                x=s.x,
                y=s.y,
                mode=s.mode,
                name=s.name,
                text=s.labels,
                hovertemplate="%{text}<br>x=%{x}<br>y=%{y}<extra></extra>" if s.labels else None,
                marker=marker,
            )
        )
    if fig.vline:
        out.add_vline(
            x=fig.vline[0], line_dash="dash", line_color="red", annotation_text=fig.vline[1]
        )
    out.update_layout(title=fig.title, xaxis_title=fig.xlabel, yaxis_title=fig.ylabel)
    if fig.xlog:
        out.update_xaxes(type="log")
    return out
