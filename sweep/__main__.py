"""Command line: `python -m sweep {run,status} --study NAME ...`."""

from __future__ import annotations

import argparse
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


COMMANDS = {
    "run": (cmd_run, "create or resume a study and run trials"),
    "status": (cmd_status, "one row per trial: state, params, metric, peak memory, tokens/s"),
}


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="python -m sweep", description=__doc__)
    sub = top.add_subparsers(dest="command", required=True)
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--study", required=True, help="study name: a [studies.NAME] table")
        p.add_argument(
            "--config", type=Path, default=Path("sweep.toml"), help="default: sweep.toml"
        )
        p.add_argument("--storage", help="Optuna storage URL (default: [storage].optuna)")
        if name == "run":
            p.add_argument("--n-trials", type=int, help="trials to run now (default: n_trials)")
            p.add_argument("--timeout", type=float, help="start no trial after SECONDS")
            p.add_argument(
                "--set",
                action="append",
                default=[],
                metavar="KEY=VALUE",
                help="override a study key, e.g. train.max_steps=20 (repeatable)",
            )
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
