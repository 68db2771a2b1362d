"""SQuAD v1.1 extractive question answering as instruction-formatted generation.

Training: passage + question → the first gold answer, loss on the answer only. Evaluation:
greedy generation (bounded length), first line stripped, scored with the official v1.1 exact
match and F1 (max over all gold answers, official normalisation), in percent.

Offline there is no training set (shared/data has the dev set only), so the dev set is split
*by article*: the articles at file positions 3, 7, 11, ... (every fourth, 12 of 48, 2,777 of
10,570 questions) are the held-out evaluation part, the other 36 articles train. No article is
in both. The number is then "F1 on 12 held-out dev articles", never the official dev score;
EVAL_SET says so in the study's attributes, MLflow and `status`.
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from pathlib import Path

from objectives.common import chat, generate_answers, open_text, split_train_val, subset

METRIC = "f1"
DIRECTION = "maximize"
LOCAL_FILES = ("squad/dev-v1.1.json.xz",)
HUB_DATASET = ("rajpurkar/squad",)
PUNCTUATION = frozenset(string.punctuation)
HELD_OUT_EVERY = 4  # offline: article i (0-based, file order) is held out when i % 4 == 3
QUESTION = (
    "Answer the question with a short span copied from the passage.\n\n"
    "Passage: {context}\n\nQuestion: {question}"
)


def preflight(data_dir: Path | None, judge: dict) -> tuple[str, str] | None:
    """Nothing beyond LOCAL_FILES: evaluation reads only the data folder."""
    return None


def eval_set(data_dir: Path | None) -> str:
    """What the study's metric is measured on, in words (shown in status and MLflow)."""
    if data_dir is None:
        return "SQuAD v1.1 validation split (hub), official dev questions"
    return (
        f"SQuAD v1.1 dev split by article: every {HELD_OUT_EVERY}th article held out "
        f"(12 of 48, 2,777 questions; not the official dev score); the other 36 train"
    )


def load(
    data_dir: Path | None,
    train_n: int,
    val_n: int,
    eval_n: int,
    seed: int,
    system_prompt: str | None,
    train_set: str | None = None,
) -> tuple[list[dict], list[dict], list[dict]]:
    train_articles, eval_articles = _read_local(data_dir) if data_dir else _read_hub()
    train, val = split_train_val(questions(train_articles), train_n, val_n, seed)
    evaluation = subset(questions(eval_articles), eval_n, seed)
    return (
        [example(q, system_prompt) for q in train],
        [example(q, system_prompt) for q in val],
        [example(q, system_prompt) for q in evaluation],
    )


def split_articles(articles: list[dict]) -> tuple[list[dict], list[dict]]:
    """(training articles, held-out evaluation articles) of the offline dev set."""
    held = [a for i, a in enumerate(articles) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1]
    kept = [a for i, a in enumerate(articles) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1]
    return kept, held


def questions(articles: list[dict]) -> list[dict]:
    """Flat list of {id, context, question, answers} from SQuAD's nested JSON layout."""
    return [
        {
            "id": qa["id"],
            "context": paragraph["context"],
            "question": qa["question"],
            "answers": [a["text"] for a in qa["answers"]],
        }
        for article in articles
        for paragraph in article["paragraphs"]
        for qa in paragraph["qas"]
    ]


def example(q: dict, system_prompt: str | None) -> dict:
    user = QUESTION.format(context=q["context"].strip(), question=q["question"].strip())
    return {
        "messages": chat(user, system_prompt),
        "answer": q["answers"][0].strip(),
        "id": q["id"],
        "answers": q["answers"],
    }


# --- the official SQuAD v1.1 metric (evaluate-v1.1.py), as plain functions -------------------
# `evaluate.load("squad")` fetches its code from the hub, which is not always reachable; the
# algorithm is short, so it lives here and tests check it against hand-computed cases and
# torchmetrics' independent implementation.


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation, drop the articles a/an/the, collapse white space."""
    text = "".join(ch for ch in text.lower() if ch not in PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, truth: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(truth))


def f1(prediction: str, truth: str) -> float:
    pred, gold = normalize_answer(prediction).split(), normalize_answer(truth).split()
    same = sum((Counter(pred) & Counter(gold)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def score(predictions: dict[str, str], gold: dict[str, list[str]]) -> dict:
    """Official aggregation: every gold question counts; a missing prediction scores 0.

    Returns percentages like the official script, plus the counts of missing and extra ids.
    """
    if not gold:
        raise ValueError("no questions to score against")
    em = f = 0.0
    for qid, answers in gold.items():
        if qid in predictions:
            em += max(exact_match(predictions[qid], a) for a in answers)
            f += max(f1(predictions[qid], a) for a in answers)
    return {
        "exact_match": 100.0 * em / len(gold),
        "f1": 100.0 * f / len(gold),
        "total": len(gold),
        "answered": sum(qid in predictions for qid in gold),
        "missing": sorted(set(gold) - set(predictions)),
        "unknown": sorted(set(predictions) - set(gold)),
    }


def gold_answers(articles: list[dict]) -> dict[str, list[str]]:
    return {q["id"]: q["answers"] for q in questions(articles)}


def first_line(generated: str) -> str:
    """The answer as scored: the first non-empty line of the generation, stripped."""
    for line in generated.strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


def evaluate(model, tokenizer, examples: list[dict], settings: dict, out_dir: Path) -> dict:
    texts = generate_answers(model, tokenizer, examples, settings)
    predictions = {e["id"]: first_line(t) for e, t in zip(examples, texts, strict=True)}
    (out_dir / "predictions.json").write_text(json.dumps(predictions, indent=1))
    result = score(predictions, {e["id"]: e["answers"] for e in examples})
    return {
        "f1": result["f1"],
        "exact_match": result["exact_match"],
        "eval_examples": len(examples),
    }


def read_dataset(path: Path) -> list[dict]:
    """The articles of a SQuAD v1.1 JSON file (plain or .xz)."""
    with open_text(path) as f:
        return json.load(f)["data"]


def _read_local(data_dir: Path) -> tuple[list[dict], list[dict]]:
    return split_articles(read_dataset(data_dir / LOCAL_FILES[0]))


def _read_hub() -> tuple[list[dict], list[dict]]:
    """The hub's flat rows regrouped as articles with one paragraph per row."""
    from datasets import load_dataset

    ds = load_dataset(*HUB_DATASET)

    def articles(split):
        return [
            {
                "paragraphs": [
                    {
                        "context": r["context"],
                        "qas": [
                            {
                                "id": r["id"],
                                "question": r["question"],
                                "answers": [{"text": t} for t in r["answers"]["text"]],
                            }
                        ],
                    }
                ]
            }
            for r in ds[split]
        ]

    return articles("train"), articles("validation")
