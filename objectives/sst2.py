"""SST-2 sentiment as instruction-formatted classification.

Training: the answer word ("negative"/"positive") is the only supervised text. Evaluation:
accuracy from the model's log-probabilities of the two label answers, not from free text.
"""

from __future__ import annotations

import csv
from pathlib import Path

from objectives.common import chat, open_text, split_train_val, subset

METRIC = "accuracy"
DIRECTION = "maximize"
LOCAL_FILES = ("sst2/train.tsv.xz", "sst2/dev.tsv")
HUB_DATASET = ("nyu-mll/glue", "sst2")
CHOICES = ("negative", "positive")  # index = GLUE label
QUESTION = "Review: {sentence}\nSentiment (positive or negative)?"
MIN_TRAIN_WORDS = 5  # SST-2 train is phrase-level; fragments like "the film" teach little


def load(
    data_dir: Path | None,
    train_n: int,
    val_n: int,
    eval_n: int,
    seed: int,
    system_prompt: str | None,
    train_set: str | None = None,
) -> tuple[list[dict], list[dict], list[dict]]:
    """Train and validation come from SST-2 train; evaluation is the 872-sentence dev set."""
    train_rows, dev_rows = _read_local(data_dir) if data_dir else _read_hub()
    train_rows = [r for r in train_rows if len(r[0].split()) >= MIN_TRAIN_WORDS]
    train, val = split_train_val(train_rows, 0, val_n, seed)
    train = alternate_labels(train)[: train_n or None]
    dev = subset(dev_rows, eval_n, seed)
    return tuple([example(s, y, system_prompt) for s, y in rows] for rows in (train, val, dev))


def alternate_labels(rows: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """Negative, positive, negative, ... (keeping the shuffled order within each label).

    Every batch is then label-balanced; with a budget of a few dozen steps, batches that lean
    on the majority label (56 % positive) make a small model collapse onto that answer.
    Rows of the larger label that have no partner are dropped.
    """
    by_label = [[r for r in rows if r[1] == label] for label in (0, 1)]
    return [row for pair in zip(*by_label, strict=False) for row in pair]


def example(sentence: str, label: int, system_prompt: str | None) -> dict:
    user = QUESTION.format(sentence=sentence.strip())
    return {
        "messages": chat(user, system_prompt),
        "answer": CHOICES[label],
        "choices": list(CHOICES),
        "label": label,
    }


def accuracy(choice_scores: list[list[float]], labels: list[int]) -> float:
    """Fraction of examples whose highest-scoring choice is the gold label (ties count wrong)."""
    if not labels:
        raise ValueError("accuracy of an empty evaluation set")
    right = 0
    for scores, label in zip(choice_scores, labels, strict=True):
        best = max(scores)
        right += scores[label] == best and scores.count(best) == 1
    return right / len(labels)


def preflight(data_dir: Path | None, judge: dict) -> tuple[str, str] | None:
    """Nothing beyond LOCAL_FILES: evaluation reads only the data folder."""
    return None


def eval_set(data_dir: Path | None) -> str:
    """What the study's metric is measured on, in words (shown in status and MLflow)."""
    return "SST-2 dev (GLUE validation: 872 sentences, or a seeded subset of eval.max_examples)"


def evaluate(model, tokenizer, examples: list[dict], settings: dict, out_dir: Path) -> dict:
    from src.scoring import choice_logprobs  # torch lives in the trial process only

    scores = choice_logprobs(model, tokenizer, examples, settings["batch_size"])
    return {
        "accuracy": accuracy(scores, [e["label"] for e in examples]),
        "eval_examples": len(examples),
    }


def _read_local(data_dir: Path) -> tuple[list, list]:
    return _read_tsv(data_dir / LOCAL_FILES[0]), _read_tsv(data_dir / LOCAL_FILES[1])


def _read_tsv(path: Path) -> list[tuple[str, int]]:
    with open_text(path) as f:
        return [
            (r["sentence"], int(r["label"]))
            for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        ]


def _read_hub() -> tuple[list, list]:
    from datasets import load_dataset

    ds = load_dataset(*HUB_DATASET)
    pairs = [[(r["sentence"], int(r["label"])) for r in ds[s]] for s in ("train", "validation")]
    return pairs[0], pairs[1]
