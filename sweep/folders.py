"""Where a trial's files live, and whether a folder is the trial's own.

Trial folders are `<[storage] trials>/<study key>/<trial number>/`. The study key is the
study's name plus a random suffix drawn when the study is created, stored on the study
(user attribute `folder`): two storages that hold a study of the same name (another SQLite
file, a journal, PostgreSQL) number their trials from 0 each, and without the suffix they
wrote into each other's folders. Studies created before the key existed keep their
`<study name>/` folders. Every reader that hands out or loads a folder's files checks it
first against the trial it reads (`mismatch`): spec.json names the study key, the trial
number and the sampled parameters.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from pathlib import Path

import optuna

KEY = "folder"


def new_key(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


def study_key(study: optuna.Study, wait_s: float = 0.0) -> str:
    """The study's folder key; `wait_s`: how long to wait for the creating sweep to store it
    (a study with no key and no trials may have been created a moment ago by another sweep);
    an older study without one keeps its name."""
    deadline = time.monotonic() + wait_s
    while True:
        key = study.user_attrs.get(KEY)
        if key or time.monotonic() >= deadline or study.get_trials(deepcopy=False):
            return key or study.study_name
        time.sleep(0.2)


def trial_folder(root: Path, study: optuna.Study, number: int) -> Path:
    return root / study_key(study) / str(number)


def mismatch(folder: Path, trial: optuna.trial.FrozenTrial, study: optuna.Study) -> str | None:
    """Why `folder` is not `trial`'s own (None when it is)."""
    spec_path = folder / "spec.json"
    if not spec_path.is_file():
        return f"{folder} holds no spec.json"
    try:
        spec = json.loads(spec_path.read_text())
    except ValueError:
        return f"{spec_path} is not valid JSON"
    key, number = spec.get("study_key"), spec.get("trial_number")
    if key is not None and key != study_key(study):
        return f"{folder} belongs to another study ({key})"
    if number is not None and number != trial.number:
        return f"{folder} belongs to trial {number}"
    params = spec.get("params", {})
    for name, value in trial.params.items():
        if name in params and not _same(params[name], value):
            return f"{folder} was written by another trial ({name}={params[name]!r}, not {value!r})"
    return None


def _same(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9)
    return a == b
