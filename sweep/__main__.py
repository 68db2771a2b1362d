"""Command line: `python -m sweep COMMAND ...` (the table COMMANDS below)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import optuna

from sweep import checks, config, mps, placement, status, study
from sweep.errors import ConfigError


def cmd_run(args: argparse.Namespace) -> None:
    if args.n_trials is not None and args.n_trials <= 0:
        raise ConfigError(f"must be > 0 (got {args.n_trials})", "--n-trials")
    if args.timeout is not None and args.timeout <= 0:
        raise ConfigError(f"must be > 0 (got {args.timeout})", "--timeout")
    gpus, per_gpu = placement.parse_gpus(args.gpus), _per_gpu(args.trials_per_gpu)
    if args.jobs <= 0:
        raise ConfigError(f"must be > 0 (got {args.jobs})", "--jobs")
    if gpus and args.jobs != 1:
        raise ConfigError("--jobs is for the CPU; with --gpus use --trials-per-gpu", "--jobs")
    if args.trials_per_gpu != "1" and not gpus:
        raise ConfigError("needs --gpus (which cards to pack)", "--trials-per-gpu")
    cfg = config.load(args.config, args.set, study=args.study)
    if args.dry_run:  # everything `run` checks before its first write, then stop
        url = config.resolve_url(args.storage, Path.cwd()) if args.storage else None
        checks.before_run(cfg, cfg.studies[args.study], url)
        print(f"study {args.study}: config, storage, data, models and evaluation needs checked")
        return
    study.run(
        cfg,
        cfg.studies[args.study],
        args.n_trials,
        args.timeout,
        config.resolve_url(args.storage, Path.cwd()) if args.storage else None,
        gpus,
        per_gpu,
        args.jobs,
        args.mps,
        _read_enqueue(args.enqueue) if args.enqueue else None,
    )


def _read_enqueue(path: Path) -> list[dict]:
    try:
        rows = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"cannot read {path}: {err}", "--enqueue") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) and r for r in rows):
        raise ConfigError("expected a JSON list of trial params objects", "--enqueue")
    return rows


def _per_gpu(text: str) -> int | None:
    if text == "auto":
        return None
    if not text.isdigit() or int(text) <= 0:
        raise ConfigError(f"expected auto or a number > 0 (got {text!r})", "--trials-per-gpu")
    return int(text)


def _open(args: argparse.Namespace, study_name: str | None):
    """(config, storage, study or None) for the commands that read a study."""
    cfg = config.load(args.config)
    storage = _storage(args.storage, cfg)
    return cfg, storage, status.load(study_name, storage) if study_name else None


def _storage(url: str | None, cfg: config.Config):
    """The Optuna storage of `--storage URL` (relative paths: from here), else the config's."""
    url = config.resolve_url(url, Path.cwd()) if url else cfg.storage.optuna
    checks.check_storage_url(url)
    return checks.make_storage(url)


def cmd_status(args: argparse.Namespace) -> None:
    _, storage, loaded = _open(args, args.study)
    if args.watch:
        status.watch(args.study, storage, args.every)
    else:
        status.show(loaded)


def _status_args(p: argparse.ArgumentParser) -> None:
    _study_args(p)
    p.add_argument("--watch", action="store_true", help="the running trials, live, until Ctrl-C")
    p.add_argument("--every", type=float, default=2.0, help="--watch: seconds between reads")


def cmd_best(args: argparse.Namespace) -> None:
    from sweep import best

    best.show(_open(args, args.study)[2])


def cmd_final(args: argparse.Namespace) -> None:
    from sweep import best, final

    cfg, _, loaded = _open(args, args.study)
    final.run(loaded, cfg.storage.mlflow, args.top, args.max_examples)
    best.show(loaded)


def _final_args(p: argparse.ArgumentParser) -> None:
    _study_args(p)
    p.add_argument("--top", type=int, default=0, help="the K best by metric (default 0: all)")
    p.add_argument(
        "--max-examples", type=int, default=0, help="evaluation rows (default 0: all of them)"
    )


def cmd_export(args: argparse.Namespace) -> None:
    from sweep import best

    out = best.export(_open(args, args.study)[2], args.trial, args.out.resolve())
    print(f"exported to {out}: load it with PeftModel.from_pretrained(base_model, {str(out)!r})")


def cmd_curves(args: argparse.Namespace) -> None:
    from sweep import curves

    cfg = config.load(args.config)
    if args.study not in cfg.studies:
        raise ConfigError(f"no study {args.study!r} in {args.config}", "--study")
    old = _read_table(args.extend, "--extend") if args.extend else None
    loaded = [status.load(args.study, _storage(url, cfg)) for url in args.storage or [None]]
    if args.top_params:
        curves.write(curves.top_params(loaded, args.top_params, old), args.out)
    else:
        alone = [int(n) for n in args.alone.split(",")] if args.alone else []
        table = curves.build(loaded, cfg.storage.trials, alone, cfg.studies[args.study], old)
        curves.write(table, args.out)
        print(f"{len(table['runs'])} runs -> {args.out}")


def _curves_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--study", required=True, help="study name: a [studies.NAME] table")
    p.add_argument("--storage", action="append", help="Optuna storage URL (repeatable)")
    p.add_argument("--alone", help="trial numbers (first storage) that ran alone: the cost model")
    p.add_argument("--top-params", type=int, help="write the K best configurations instead")
    p.add_argument("--extend", type=Path, help="a table written before: add these runs to it")
    p.add_argument("--out", type=Path, required=True, help="FILE.json or FILE.json.xz")


def cmd_replay(args: argparse.Namespace) -> None:
    from sweep import replay

    for flag, value in (("--seeds", args.seeds), ("--budget", args.budget),
                        ("--parallel", args.parallel)):  # fmt: skip
        if value <= 0:
            raise ConfigError(f"{flag} must be > 0", flag)
    table = _read_table(args.table, "--table")
    cfg = config.load(args.config)
    live = _live_study(args.live, args.study or table["study"]) if args.live else None
    names = args.strategies.split(",") if args.strategies else None
    result = replay.replay(table, cfg, args.study, args.seeds, args.budget, names,
                           args.seed_noise, args.parallel)  # fmt: skip
    if live:
        result["live"] = replay.live(replay.Table(table), *live, result)
    if args.plot:
        replay.plot(result, args.plot)
    print(json.dumps(result, indent=1) if args.json else replay.show(result))


def _read_table(path: Path, flag: str) -> dict:
    """A learning-curve table, or one clear line about the file."""
    from sweep import curves

    if not path.is_file():
        raise ConfigError(f"no such file: {path}", flag)
    try:
        return curves.read(path)
    except (OSError, ValueError, EOFError) as err:
        raise ConfigError(f"not a learning-curve table: {err}", flag) from None


def _live_study(url: str, name: str) -> tuple:
    """(study, companion or None) of `replay --live`, read only: a storage that is not there
    is not created; checked before the replay runs."""
    import sqlalchemy.exc

    url = config.resolve_url(url, Path.cwd())
    path = checks._sqlite_path(url)
    if path is not None and not path.is_file():
        raise ConfigError(f"no such database: {url}", "--live")
    try:
        storage = checks.make_storage(url)
        found = optuna.load_study(study_name=name, storage=storage, sampler=None)
    except KeyError:
        raise ConfigError(f"no study {name!r} in {url}", "--live") from None
    except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError) as err:
        reason = str(err).splitlines()[0]
        raise ConfigError(f"not an Optuna storage: {url} ({reason})", "--live") from None
    return found, _companion(name, storage)


def _companion(name: str, storage) -> optuna.Study | None:
    """The study's validation-loss companion (the pruner's mirror trials), if it has one."""
    try:
        return optuna.load_study(study_name=f"{name}--val-loss", storage=storage)
    except KeyError:
        return None


def _replay_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--table", type=Path, required=True, help="a `sweep curves` table")
    p.add_argument("--study", help="whose sampler and pruner (default: [defaults]' on the table)")
    p.add_argument("--seeds", type=int, default=20, help="replays per strategy (default 20)")
    p.add_argument("--budget", type=float, default=30, help="full trials' cost per seed (30)")
    p.add_argument("--strategies", help="only these of the alternatives (comma-separated)")
    p.add_argument("--json", action="store_true", help="one JSON object instead of text")
    p.add_argument("--plot", type=Path, help="anytime curves as a PNG")
    p.add_argument("--live", metavar="STORAGE", help="a real study's storage to set against it")
    p.add_argument("--seed-noise", action="store_true",
                   help="trials see the metric with the table's seed noise added")  # fmt: skip
    p.add_argument("--parallel", type=int, default=1,
                   help="trials in flight at once, as a packed sweep runs them (1)")  # fmt: skip


def cmd_report(args: argparse.Namespace) -> None:
    from sweep import report, tracking

    cfg, storage, study = _open(args, args.study)
    out = (args.out or cfg.storage.reports / args.study).resolve()
    budget = study.user_attrs.get("vram_budget_gb", 0.0)
    path = report.write(
        study, _companion(args.study, storage), out, budget, args.examples, args.max_new_tokens
    )
    run_id = tracking.log_report(cfg.storage.mlflow, args.study, out)
    print(f"report: {path} and {path.with_suffix('.html')}")
    if run_id:
        print(f"logged to MLflow run {run_id} (experiment {args.study}), folder report/")


def cmd_dashboard(args: argparse.Namespace) -> None:
    from sweep import servers

    cfg, _, study = _open(args, args.study)
    url = config.resolve_url(args.storage, Path.cwd()) if args.storage else cfg.storage.optuna
    servers.dashboard(url, args.host, args.port, study._study_id if study else None)


def cmd_ui(args: argparse.Namespace) -> None:
    from sweep import servers

    cfg = config.load(args.config)
    servers.ui(cfg.storage.mlflow, cfg.storage.artifacts, args.host, args.port)


def cmd_score(args: argparse.Namespace) -> None:
    from sweep.score import score  # numpy/sklearn only when scoring

    cfg = config.load(args.config) if args.config.is_file() else None
    result = score(args.task, args.file, args.dataset, args.data, args.judge, args.judge_model, cfg)
    print(json.dumps(result, indent=1))


def cmd_prepare(args: argparse.Namespace) -> None:
    """Convert every package-shipped GGUF model of the config once, in a child process (the
    sweep process never imports torch): `make install` runs this."""
    import importlib.util
    import subprocess

    from sweep import trial_process

    cfg = config.load(args.config)
    shipped = {(m.package, m.gguf_file) for m in cfg.models.values() if m.package}
    for package, gguf_file in sorted(shipped):  # several aliases may share one file
        if importlib.util.find_spec(package) is None:
            continue
        argv = [sys.executable, "-m", "src.models", package, gguf_file, str(cfg.storage.cache)]
        env = trial_process.child_env()
        # its progress bars and library warnings only with --verbose or when it fails
        done = subprocess.run(argv, cwd=trial_process.PROJECT_ROOT, env=env, text=True,
                              capture_output=not args.verbose)  # fmt: skip
        if done.returncode:
            sys.stderr.write((done.stderr or "")[-3000:])
            raise SystemExit(f"error: converting {package}'s {gguf_file} failed")
        if done.stdout:
            print(f"{package}'s {gguf_file}: {done.stdout.strip().splitlines()[-1]}")


def cmd_bench(args: argparse.Namespace) -> None:
    from sweep import bench

    if args.whole_trial:
        from sweep import whole_trial

        whole_trial.run(args)
    else:
        bench.overhead(args) if args.overhead else bench.run(args)


def _bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default="0.5B",
        help="Qwen2.5 shape (0.5B 1.5B 3B 7B 14B: a "
        "random-weight checkpoint is built once) or a model folder",
    )
    p.add_argument("--seq", type=int, default=1024, help="tokens per sequence (default 1024)")
    p.add_argument("--batch", type=int, default=8, help="sequences per step (default 8)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (alpha = 2 x rank)")
    p.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout (default 0.05)")
    p.add_argument("--steps", type=int, default=8, help="measured steps (median; default 8)")
    p.add_argument("--warmup", type=int, default=3, help="steps before measuring (default 3)")
    p.add_argument("--rounds", type=int, default=1, help="plain/trial alternations (default 1)")
    p.add_argument(
        "--study",
        default="sst2",
        help="the study whose settings the bench uses ([train]; --whole-trial and --overhead: "
        "its data, [eval] and task too)",
    )
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME[:KEY=V,...]",
        help="a trial-path variant with [train] (or eval.KEY: [eval]) overrides, e.g. "
        "'no-ckpt:gradient_checkpointing=false' (repeatable; default: trial)",
    )
    p.add_argument(
        "--tokenizer",
        default="Qwen/Qwen2.5-0.5B-Instruct",
        help="tokenizer saved with a built checkpoint: a folder or a hub id (default: Qwen2.5's)",
    )
    p.add_argument("--out", type=Path, default=Path("docs/bench"), help="default: docs/bench")
    p.add_argument(
        "--profile", action="store_true", help="also profile one forward+backward of every recipe"
    )
    p.add_argument(
        "--overhead",
        action="store_true",
        help="time one real trial of --study (--steps steps) instead",
    )
    p.add_argument(
        "--cold",
        action="store_true",
        help="--whole-trial: measure with the kernel caches as they are (default: a short "
        "trial-path trial fills them first, as a sweep's first trial does for the rest)",
    )
    p.add_argument(
        "--whole-trial",
        action="store_true",
        help="one whole trial of --study on --model, plain recipe + model.generate against "
        "the trial path, per phase (docs/bench/whole-trial-STUDY-SHAPE.json)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a key of --study, e.g. data.dir=... (repeatable)",
    )
    p.add_argument(
        "--warm",
        action="store_true",
        help="--overhead: start the trial process ahead, as a sweep does for its next trial",
    )
    p.add_argument(
        "--trials",
        type=int,
        default=1,
        help="--overhead: this many trials one after another in one worker process, its base "
        "model kept between them (default 1)",
    )


def _study_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--study", required=True, help="study name: a [studies.NAME] table")
    p.add_argument("--storage", help="Optuna storage URL (default: [storage].optuna)")


def _export_args(p: argparse.ArgumentParser) -> None:
    _study_args(p)
    p.add_argument("--trial", type=int, required=True, help="trial number (see status/best)")
    p.add_argument("--out", type=Path, required=True, help="a new or empty folder")


def _report_args(p: argparse.ArgumentParser) -> None:
    _study_args(p)
    p.add_argument("--out", type=Path, help="folder (default: storage/reports/STUDY)")
    p.add_argument(
        "--examples", type=int, default=3, help="prompts answered by base and best models (0: none)"
    )
    p.add_argument("--max-new-tokens", type=int, default=32, help="length of those answers")


def _server_args(port: int, study: bool):
    def add(p: argparse.ArgumentParser) -> None:
        if study:
            p.add_argument("--study", help="open this study's page")
            p.add_argument("--storage", help="Optuna storage URL (default: [storage].optuna)")
        p.add_argument("--host", default="127.0.0.1", help="default: 127.0.0.1 (this machine)")
        p.add_argument("--port", type=int, default=port, help=f"default: {port}")

    return add


def _run_args(p: argparse.ArgumentParser) -> None:
    _study_args(p)
    p.add_argument("--n-trials", type=int, help="trials to run now (default: n_trials)")
    p.add_argument("--timeout", type=float, help="start no trial after SECONDS")
    p.add_argument(
        "--gpus", help="run trials on these GPUs, e.g. 0,1 (default: one trial at a time)"
    )
    p.add_argument(
        "--trials-per-gpu",
        default="1",
        help="trials sharing a GPU: a number, or auto (packed by their learned peak memory)",
    )
    p.add_argument("--jobs", type=int, default=1, help="trials at once on the CPU (default 1)")
    p.add_argument(
        "--enqueue",
        type=Path,
        metavar="JSON",
        help="a JSON list of trial params to run first (e.g. the best of another study)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="check config, storage, data, models and what evaluation needs; train nothing",
    )
    p.add_argument(
        "--mps",
        choices=mps.MODES,
        default="auto",
        help="trials sharing a GPU run through a CUDA MPS daemon of the sweep (auto: where "
        "nvidia-cuda-mps-control is installed and none runs yet; off: time-sliced)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a study key, e.g. train.max_steps=20 (repeatable)",
    )


def _score_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("task", choices=("squad", "alpacaeval"))
    p.add_argument(
        "file",
        type=Path,
        help="squad: {question_id: answer} JSON; alpacaeval: annotations "
        "(or model outputs with --judge)",
    )
    p.add_argument("--dataset", type=Path, help="squad: the dev JSON (default: from --data)")
    p.add_argument(
        "--data", type=Path, help="offline data folder (default: $SWEEP_DATA_DIR, else the hub)"
    )
    p.add_argument("--judge", help="alpacaeval: judge model outputs first (local, openai, m:f)")
    p.add_argument("--judge-model", help="model alias of the local judge (sweep.toml)")


COMMANDS = {
    "run": (cmd_run, _run_args, "create or resume a study and run trials"),
    "status": (
        cmd_status,
        _status_args,
        "one row per trial: state, params, metric, peak memory, tokens/s",
    ),
    "best": (cmd_best, _study_args, "the Pareto-optimal trials: best metric for its memory"),
    "report": (cmd_report, _report_args, "plots and tables of a study (Markdown, HTML, MLflow)"),
    "final": (cmd_final, _final_args, "the Pareto-optimal trials on the whole evaluation set"),
    "export": (cmd_export, _export_args, "copy a trial's adapter, config and metrics to a folder"),
    "dashboard": (cmd_dashboard, _server_args(8080, True), "optuna-dashboard on the storage"),
    "ui": (cmd_ui, _server_args(5000, False), "the MLflow UI on the tracking store"),
    "bench": (cmd_bench, _bench_args, "trial path vs the plain QLoRA recipe: speed, memory"),
    "score": (cmd_score, _score_args, "task metrics of a predictions/annotations file, as JSON"),
    "curves": (cmd_curves, _curves_args, "a study's learning curves as a table for `replay`"),
    "replay": (cmd_replay, _replay_args, "a sampler and pruner against a learning-curve table"),
    "prepare": (cmd_prepare, lambda p: None, "convert the package-shipped models once"),
}


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="python -m sweep", description=__doc__)
    sub = top.add_subparsers(dest="command", required=True)
    for name, (_, add_args, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument(
            "--config", type=Path, default=Path("sweep.toml"), help="default: sweep.toml"
        )
        p.add_argument(
            "--verbose", action="store_true", help="show the libraries' own log lines too"
        )
        add_args(p)
    return top


def quiet_libraries() -> None:
    """Optuna's study lines, MLflow's and Alembic's database set-up: log records below
    WARNING are not for the user of a sweep (`--verbose` keeps them)."""
    import logging
    import os

    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read when mlflow is imported
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for name in ("mlflow", "alembic", "urllib3", "httpx", "datasets", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if not args.verbose:
        quiet_libraries()
    try:
        COMMANDS[args.command][0](args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the running trial was stopped and marked failed", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
