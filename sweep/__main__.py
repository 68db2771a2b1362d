"""Command line: `python -m sweep {run,status,score} ...`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sweep import checks, config, status, study
from sweep.errors import ConfigError


def cmd_run(args: argparse.Namespace) -> None:
    if args.n_trials is not None and args.n_trials <= 0:
        raise ConfigError(f"must be > 0 (got {args.n_trials})", "--n-trials")
    if args.timeout is not None and args.timeout <= 0:
        raise ConfigError(f"must be > 0 (got {args.timeout})", "--timeout")
    cfg = config.load(args.config, args.set, study=args.study)
    study.run(
        cfg,
        cfg.studies[args.study],
        args.n_trials,
        args.timeout,
        config.resolve_url(args.storage, Path.cwd()) if args.storage else None,
    )


def cmd_status(args: argparse.Namespace) -> None:
    cfg = config.load(args.config)
    url = config.resolve_url(args.storage, Path.cwd()) if args.storage else cfg.storage.optuna
    checks.check_storage_url(url)
    status.show(args.study, checks.make_storage(url))


def cmd_score(args: argparse.Namespace) -> None:
    from sweep.score import score  # numpy/sklearn only when scoring

    cfg = config.load(args.config) if args.config.is_file() else None
    result = score(args.task, args.file, args.dataset, args.data, args.judge, args.judge_model, cfg)
    print(json.dumps(result, indent=1))


def _study_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--study", required=True, help="study name: a [studies.NAME] table")
    p.add_argument("--storage", help="Optuna storage URL (default: [storage].optuna)")


def _run_args(p: argparse.ArgumentParser) -> None:
    _study_args(p)
    p.add_argument("--n-trials", type=int, help="trials to run now (default: n_trials)")
    p.add_argument("--timeout", type=float, help="start no trial after SECONDS")
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
        _study_args,
        "one row per trial: state, params, metric, peak memory, tokens/s",
    ),
    "score": (cmd_score, _score_args, "task metrics of a predictions/annotations file, as JSON"),
}


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="python -m sweep", description=__doc__)
    sub = top.add_subparsers(dest="command", required=True)
    for name, (_, add_args, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument(
            "--config", type=Path, default=Path("sweep.toml"), help="default: sweep.toml"
        )
        add_args(p)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
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
