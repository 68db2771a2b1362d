"""Imports run one way (../shared/STYLE.md, point 5): the sweep process on top; the trial
process's entry points (src/train_qlora.py and the other `python -m src.X` commands) above the
objectives they run; the helpers objectives use (models, data, generation, scoring, ...)
below them, never reaching back up; and no circle of files, lazy imports inside functions
included."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

PACKAGES = ("sweep", "objectives", "src")
# `python -m src.X` commands: they run objectives, so they sit above them
ENTRY_POINTS = {"src.train_qlora", "src.evaluate_adapter", "src.examples", "src.bench", "src.judge"}
SHARED_DATA = {"sweep.results"}  # TrialResult: plain data both processes read and write


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).glob("*.py")):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            out[name] = path
    return out


def _imports(path: Path, known: set[str]) -> set[str]:
    """Project modules `path` imports anywhere in it (`from pkg import mod` counts as mod)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found |= {n for n in names if n in known}
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {name: _imports(path, set(modules)) - {name} for name, path in modules.items()}
    for name in graph:  # `from objectives import X` names both; the package edge is X's
        submodules = {m for m in graph[name] if "." in m}
        graph[name] -= {m.split(".")[0] for m in submodules}
    return graph


def test_no_circle_of_files():
    graph = _graph()
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError(" -> ".join([*path[path.index(nxt) :], nxt]))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_helpers_never_reach_up():
    graph = _graph()
    helpers = {m for m in graph if m.startswith("src") and m not in ENTRY_POINTS}
    for module in sorted(helpers):
        up = {
            m for m in graph[module] if m.startswith(("objectives", "sweep")) or m in ENTRY_POINTS
        }
        assert not up, f"{module} (a helper) imports {sorted(up)}"


def test_objectives_import_only_helpers():
    graph = _graph()
    for module in sorted(m for m in graph if m.startswith("objectives")):
        up = {m for m in graph[module] if m.startswith("sweep") or m in ENTRY_POINTS}
        assert not up, f"{module} imports {sorted(up)}"


def test_trial_process_never_imports_the_sweep():
    graph = _graph()
    for module in sorted(ENTRY_POINTS):
        up = {m for m in graph[module] if m.startswith("sweep") and m not in SHARED_DATA}
        assert not up, f"{module} imports {sorted(up)}"
