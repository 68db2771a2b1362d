"""`python -m sweep score TASK FILE`: the task metrics of a predictions file, as JSON.

    python -m sweep score squad PREDICTIONS.json [--dataset DEV_JSON]
    python -m sweep score alpacaeval ANNOTATIONS.json
    python -m sweep score alpacaeval OUTPUTS.json --judge local|openai|pkg.mod:fn

The numbers are the ones a sweep optimises, so they can be checked against the official
scripts and leaderboards (tests/sweep/test_score.py does).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from objectives import alpacaeval, squad
from sweep.config import DATA_DIR_ENV, Config
from sweep.errors import ConfigError

ANNOTATION_FIELDS = ("instruction", "output_1", "output_2", "preference")
OUTPUT_FIELDS = ("instruction", "output")


def score(
    task: str,
    path: Path,
    dataset: Path | None,
    data_dir: Path | None,
    judge: str | None,
    judge_model: str | None,
    cfg: Config | None,
) -> dict:
    data_dir = data_dir or (Path(os.environ[DATA_DIR_ENV]) if DATA_DIR_ENV in os.environ else None)
    if task == "squad":
        if judge:
            raise ConfigError("squad needs no judge", "--judge")
        return score_squad(read_json(path, dict, "FILE"), dataset, data_dir)
    if dataset:
        raise ConfigError("alpacaeval reads its references from --data", "--dataset")
    rows = read_json(path, list, "FILE")
    if judge:
        rows = judge_outputs(rows, judge, judge_model, data_dir, cfg)
    check_fields(rows, ANNOTATION_FIELDS, "FILE")
    cache = cfg.storage.cache if cfg else None
    return alpacaeval.metrics(rows, alpacaeval.lc_inputs(data_dir, cache))


def score_squad(predictions: dict, dataset: Path | None, data_dir: Path | None) -> dict:
    bad = [k for k, v in predictions.items() if not isinstance(v, str)]
    if bad:
        raise ConfigError(f"answers must be strings (question {bad[0]!r})", "FILE")
    if dataset is None and data_dir is not None:
        dataset = data_dir / squad.LOCAL_FILES[0]
    if dataset is None:
        articles = squad._read_hub()[1]
    else:
        if not dataset.is_file():
            raise ConfigError(f"no such file: {dataset}", "--dataset")
        try:
            articles = squad.read_dataset(dataset)
        except (ValueError, KeyError, TypeError) as err:
            raise ConfigError(
                f"{dataset} is not a SQuAD v1.1 JSON file ({err})", "--dataset"
            ) from None
    result = squad.score(predictions, squad.gold_answers(articles))
    for kind, note in (("missing", "score 0"), ("unknown", "are not in the dataset, ignored")):
        ids = result[kind]
        if ids:
            print(f"{len(ids)} question ids {kind} ({note}): {', '.join(ids[:5])}", file=sys.stderr)
        result[kind] = len(ids)
    return result


def judge_outputs(
    rows: list, judge: str, judge_model: str | None, data_dir: Path | None, cfg: Config | None
) -> list[dict]:
    """Model outputs → annotations against the reference outputs, judged by `judge`."""
    from objectives import judges

    if judge not in ("local", "openai") and ":" not in judge:
        raise ConfigError(f"unknown judge {judge!r}: local, openai or package.module:function")
    check_fields(rows, OUTPUT_FIELDS, "FILE")
    references = {r["instruction"]: r["output"] for r in alpacaeval.read_references(data_dir)}
    unknown = [r["instruction"] for r in rows if r["instruction"] not in references]
    if unknown:
        raise ConfigError(f"{len(unknown)} instructions are not AlpacaEval's: {unknown[0]!r}")
    records = alpacaeval.pair_records(rows, references)
    try:
        prefs = _judge(records, judge, judge_model, cfg)
    except judges.JudgeUnavailable as err:
        raise ConfigError(f"judge {judge!r} unavailable: {err}", "--judge") from None
    return judges.annotate(records, prefs, judge)


def _judge(records: list[dict], judge: str, judge_model: str | None, cfg: Config | None) -> list:
    from objectives import judges

    if judge == "local":
        return _local(records, judge_model, cfg)
    if judge == "openai":  # endpoint and model from the environment, like the key
        return judges.openai_judge(
            records,
            model=os.environ.get("SWEEP_JUDGE_MODEL", "gpt-4-1106-preview"),
            base_url=os.environ.get("SWEEP_JUDGE_BASE_URL"),
        )
    return judges.plugged_in(judge)(records)


def _local(records: list[dict], alias: str | None, cfg: Config | None) -> list[float]:
    if cfg is None:
        raise ConfigError("the local judge needs sweep.toml for its model", "--config")
    alias = alias or next(iter(cfg.models))
    if alias not in cfg.models:
        from sweep.errors import unknown

        raise unknown("model alias", alias, cfg.models, "--judge-model")
    from objectives.judges import local_judge
    from src import models
    from sweep.trial import model_spec

    model, tokenizer, _ = models.load_base(model_spec(cfg.models[alias]), "auto", cfg.storage.cache)
    return local_judge(model, tokenizer, records, batch_size=4)


def read_json(path: Path, kind: type, key: str):
    if not path.is_file():
        raise ConfigError(f"no such file: {path}", key)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path} is not valid JSON ({err})", key) from None
    if not isinstance(value, kind):
        what = "an object {question_id: answer}" if kind is dict else "a list of records"
        raise ConfigError(f"{path} should hold {what}, not {type(value).__name__}", key)
    if not value:
        raise ConfigError(f"{path} is empty", key)
    return value


def check_fields(rows: list, fields: tuple[str, ...], key: str) -> None:
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ConfigError(f"record {i} is {type(row).__name__}, not an object", key)
        missing = [f for f in fields if f not in row]
        if missing:
            raise ConfigError(f"record {i} lacks {', '.join(missing)}", key)
