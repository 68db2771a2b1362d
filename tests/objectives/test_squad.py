from __future__ import annotations

import random

import pytest

from objectives import squad


def test_normalisation_follows_the_official_script():
    assert squad.normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert squad.normalize_answer("an apple, a pear") == "apple pear"
    assert squad.normalize_answer("Theatre") == "theatre"  # "the" only as a word
    assert squad.normalize_answer("  U.S.A.  ") == "usa"


def test_exact_match_and_f1_by_hand():
    assert squad.exact_match("the Denver Broncos", "Denver Broncos") == 1.0
    assert squad.exact_match("Denver", "Denver Broncos") == 0.0
    # pred {denver}, gold {denver, broncos}: precision 1, recall 1/2 → F1 2/3
    assert squad.f1("Denver", "Denver Broncos") == pytest.approx(2 / 3)
    # pred {broncos, won, title} vs gold {denver, broncos}: 1 common, P 1/3, R 1/2 → 0.4
    assert squad.f1("Broncos won the title", "Denver Broncos") == pytest.approx(0.4)
    assert squad.f1("", "Denver") == 0.0
    assert squad.f1("a", "the") == 0.0  # both normalise to nothing: no common token
    # as the official script: an answer of "." (question 57340d124776f419006617bf has one)
    # matches exactly but has F1 0
    assert squad.exact_match(".", ".") == 1.0 and squad.f1(".", ".") == 0.0


def test_score_takes_the_best_gold_answer_and_counts_missing_as_zero():
    gold = {"q1": ["Denver Broncos", "Broncos"], "q2": ["1998"], "q3": ["Paris"]}
    preds = {"q1": "the broncos", "q2": "in 1998 or 1999", "x": "stray"}
    result = squad.score(preds, gold)
    # q1 exact (2nd answer), q2 F1 = 2·(1/4·1)/(1/4+1) = 0.4, q3 missing
    assert result["exact_match"] == pytest.approx(100 / 3)
    assert result["f1"] == pytest.approx(100 * (1 + 0.4) / 3)
    assert result["missing"] == ["q3"] and result["unknown"] == ["x"]


def test_metric_equals_torchmetrics_on_perturbed_dev_answers(shared_data):
    """torchmetrics' SQuAD metric is an independent port of the official v1.1 script."""
    from torchmetrics.functional.text import squad as tm_squad

    articles = squad.read_dataset(shared_data / squad.LOCAL_FILES[0])
    gold = squad.gold_answers(articles[:6])
    rng = random.Random(0)
    preds = {}
    for qid, answers in gold.items():
        words = answers[rng.randrange(len(answers))].split()
        choice = rng.randrange(5)
        if choice == 1:
            words = words[1:] or ["nothing"]
        elif choice == 2:
            words = ["the", *words, "of", "it"]
        elif choice == 3:
            words = [w.upper() + "," for w in words]
        elif choice == 4:
            words = rng.sample(words, len(words))[:2]
        preds[qid] = " ".join(words)
    ours = squad.score(preds, gold)
    theirs = tm_squad(
        [{"prediction_text": p, "id": q} for q, p in preds.items()],
        [{"answers": {"text": a, "answer_start": [0] * len(a)}, "id": q} for q, a in gold.items()],
    )
    assert 0 < ours["exact_match"] < 100 and 0 < ours["f1"] < 100
    assert ours["exact_match"] == pytest.approx(float(theirs["exact_match"]), abs=1e-4)
    assert ours["f1"] == pytest.approx(float(theirs["f1"]), abs=1e-4)


def test_offline_split_is_by_article_and_deterministic(shared_data):
    articles = squad.read_dataset(shared_data / squad.LOCAL_FILES[0])
    train, held = squad.split_articles(articles)
    assert (len(train), len(held)) == (36, 12)
    assert not {a["title"] for a in train} & {a["title"] for a in held}
    train_ids = set(squad.gold_answers(train))
    held_ids = set(squad.gold_answers(held))
    assert len(held_ids) == 2777 and not train_ids & held_ids

    a = squad.load(shared_data, 50, 10, 40, seed=1, system_prompt="")
    b = squad.load(shared_data, 50, 10, 40, seed=1, system_prompt="")
    assert a == b and [len(part) for part in a] == [50, 10, 40]
    assert {e["id"] for e in a[2]} <= held_ids and {e["id"] for e in a[0]} <= train_ids
    assert a[0][0]["answer"] in a[0][0]["messages"][-1]["content"]  # an extractive span


@pytest.mark.parametrize(
    "text, answer", [("Paris\nIt is the capital.", "Paris"), ("\n  Denver  \n", "Denver"), ("", "")]
)
def test_first_line(text, answer):
    assert squad.first_line(text) == answer
