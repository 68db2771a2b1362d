"""What a running sweep shows: one table of the running trials, updated in place (rich), with
the study's counts and best above it. `sweep run` draws it from the trials' progress events;
`sweep status --watch` from what the sweep writes onto each running trial (`LIVE` user
attribute, every few seconds), so it works from another terminal or host.

Rows are plain dicts (`Progress.row`), the same in both places; `render` draws them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import optuna
from optuna.trial import TrialState
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

LIVE = "live"  # the trial user attribute holding its latest row
WRITE_EVERY_S = 5.0  # onto the storage: often enough to watch, rare enough to cost nothing
PLAIN_EVERY_S = 30.0  # lines per running trial when the output is not a terminal

PHASES = {  # progress event -> phase shown
    "start": "loading",
    "data": "loading",
    "train_begin": "training",
    "train": "training",
    "validating": "validating",
    "eval": "training",
    "eval_accuracy": "training",
    "train_end": "saving",
    "evaluating": "evaluating",
    "judging": "judging",
}
# the "GiB" column: the GPU peak so far on CUDA (gpu_gib), else the process's resident peak


class Progress:
    """One running trial's state, from its progress events."""

    def __init__(self, number: int, params: dict, max_steps: int):
        self.number, self.params, self.max_steps = number, params, max_steps
        self.started = time.time()
        self.phase, self.step = "starting", 0
        self.loss = self.val_loss = self.tokens_per_s = self.gpu_gib = None
        self._train_t0: float | None = None
        self._tokens0 = 0

    def update(self, event: dict) -> None:
        kind = event.get("event")
        if kind == "phase":
            self.phase = event.get("name", self.phase)
        elif kind in PHASES:
            self.phase = PHASES[kind]
        if kind == "train":
            now = event.get("time", time.time())
            if self._train_t0 is None:
                self._train_t0, self._tokens0 = now, event.get("tokens", 0)
            self.step, self.loss = event.get("step", self.step), event.get("loss")
            if now > self._train_t0:
                self.tokens_per_s = (event.get("tokens", 0) - self._tokens0) / (
                    now - self._train_t0
                )
            if event.get("gpu_gib") is not None:
                self.gpu_gib = event["gpu_gib"]
        elif kind == "memory" and event.get("cpu_gib") is not None:
            self.gpu_gib = event["cpu_gib"]  # on the CPU: the process's resident peak
        elif kind == "eval":
            self.val_loss = event.get("val_loss")
        elif kind == "evaluating" and event.get("train_peak_gib") is not None:
            self.gpu_gib = event["train_peak_gib"]

    def row(self) -> dict:
        now = time.time()
        left = None
        if self.phase == "training" and self._train_t0 and self.step:
            per_step = (now - self._train_t0) / self.step
            left = per_step * (self.max_steps - self.step)
        return {
            "number": self.number,
            "model": self.params.get("model"),
            "r": self.params.get("r"),
            "lr": self.params.get("lr"),
            "phase": self.phase,
            "step": self.step,
            "max_steps": self.max_steps,
            "loss": self.loss,
            "val_loss": self.val_loss,
            "tokens_per_s": self.tokens_per_s,
            "gpu_gib": self.gpu_gib,
            "elapsed_s": now - self.started,
            "left_s": left,
            "updated": now,
        }


class Board:
    """The running trials of this sweep (threads update it, the view reads it)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._trials: dict[int, Progress] = {}

    def add(self, progress: Progress) -> None:
        with self._lock:
            self._trials[progress.number] = progress

    def remove(self, number: int) -> None:
        with self._lock:
            self._trials.pop(number, None)

    def rows(self) -> list[dict]:
        with self._lock:
            return [p.row() for p in sorted(self._trials.values(), key=lambda p: p.number)]


BOARD = Board()  # this sweep process's running trials


def header(study: optuna.Study, planned: int | None, slots: str = "") -> dict:
    """The study line's numbers: trials by state, the best metric and its trial."""
    trials = study.get_trials(deepcopy=False)
    states = {s.name.lower(): 0 for s in TrialState}
    for t in trials:
        states[t.state.name.lower()] += 1
    done = [t for t in trials if t.state == TrialState.COMPLETE and t.values]
    maximize = study.directions[0] == optuna.study.StudyDirection.MAXIMIZE
    best = max(done, key=lambda t: t.values[0] if maximize else -t.values[0]) if done else None
    return {
        "study": study.study_name,
        "metric": study.user_attrs.get("metric", "metric"),
        "states": {k: v for k, v in states.items() if v},
        "planned": planned,
        "best": None if best is None else {"number": best.number, "value": best.values[0]},
        "slots": slots,
    }


def _num(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _duration(seconds) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    return (
        f"{seconds // 60}:{seconds % 60:02d}"
        if seconds < 3600
        else f"{seconds // 3600}h{seconds % 3600 // 60:02d}"
    )


def render(head: dict, rows: list[dict]) -> Group:
    states = ", ".join(f"{n} {s}" for s, n in head["states"].items()) or "no trials yet"
    planned = f" (of {head['planned']} planned)" if head.get("planned") else ""
    best = head["best"]
    best_text = "-" if best is None else f"{best['value']:.4f} (trial {best['number']})"
    line = f"study {head['study']}: {states}{planned} · best {head['metric']} {best_text}"
    if head.get("slots"):
        line += f" · {head['slots']}"
    table = Table(box=None, pad_edge=False, header_style="bold")
    columns = ("#", "model", "r", "lr", "phase", "step", "loss", "val loss", "tok/s", "GiB",
               "elapsed", "left")  # fmt: skip
    for col in columns:
        table.add_column(col, justify="left" if col in ("model", "phase") else "right")
    for r in rows:
        table.add_row(
            str(r["number"]),
            str(r.get("model") or "-"),
            _num(r.get("r"), "d"),
            _num(r.get("lr"), ".2e"),
            r["phase"],
            f"{r['step']}/{r['max_steps']}",
            _num(r.get("loss"), ".4f"),
            _num(r.get("val_loss"), ".4f"),
            _num(r.get("tokens_per_s"), ",.0f"),
            _num(r.get("gpu_gib"), ".2f"),
            _duration(r.get("elapsed_s")),
            _duration(r.get("left_s")),
        )
    if not rows:
        return Group(Text(line), Text("no trial running"))
    return Group(Text(line), table)


def plain(row: dict) -> str:
    """One running trial as a line, for output that is not a terminal."""
    return (
        f"trial {row['number']} {row['phase']} step {row['step']}/{row['max_steps']} "
        f"loss {_num(row.get('loss'), '.4f')} val loss {_num(row.get('val_loss'), '.4f')} "
        f"{_num(row.get('tokens_per_s'), ',.0f')} tok/s {_num(row.get('gpu_gib'), '.2f')} GiB "
        f"elapsed {_duration(row.get('elapsed_s'))} left {_duration(row.get('left_s'))}"
    )


class View:
    """The live table while `draw` has something to show: in place on a terminal, else plain
    lines every PLAIN_EVERY_S. `draw()` returns (header, rows)."""

    def __init__(self, console: Console, draw: Callable[[], tuple[dict, list[dict]]],
                 refresh_s: float = 1.0):  # fmt: skip
        self.console, self.draw, self.refresh_s = console, draw, refresh_s
        self._stop = threading.Event()
        self._live: Live | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> View:
        if self.console.is_terminal:
            self._live = Live(
                get_renderable=lambda: render(*self.draw()),
                console=self.console,
                refresh_per_second=1 / self.refresh_s,
                transient=True,  # the table goes at the end; the finished-trial lines stay
                redirect_stdout=False,
                redirect_stderr=False,
            )
            self._live.__enter__()
        else:
            self._thread = threading.Thread(target=self._plain, daemon=True)
            self._thread.start()
        return self

    def _plain(self) -> None:
        while not self._stop.wait(PLAIN_EVERY_S):
            for row in self.draw()[1]:
                self.console.print(plain(row), highlight=False)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._live is not None:
            self._live.__exit__(*exc)
