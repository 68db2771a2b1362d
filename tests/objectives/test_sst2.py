from __future__ import annotations

import pytest

from objectives import sst2


def test_accuracy_on_hand_made_scores():
    scores = [[-1.0, -2.0], [-3.0, -0.5], [-0.2, -0.1], [-1.0, -1.0]]
    labels = [0, 1, 0, 1]
    # right, right, wrong (label 0 scored lower), tie counts wrong
    assert sst2.accuracy(scores, labels) == 0.5
    with pytest.raises(ValueError):
        sst2.accuracy([], [])


def test_local_data_splits(shared_data):
    train, val, dev = sst2.load(
        shared_data, train_n=100, val_n=20, eval_n=0, seed=0, system_prompt=""
    )
    assert (len(train), len(val), len(dev)) == (100, 20, 872)
    assert {e["answer"] for e in dev} == {"negative", "positive"}
    assert sum(e["label"] for e in dev) == 444  # the dev set's positives
    assert not {e["messages"][-1]["content"] for e in train} & {
        e["messages"][-1]["content"] for e in val
    }
    assert dev[0]["messages"][0] == {"role": "system", "content": ""}


def test_eval_subset_is_deterministic(shared_data):
    a = sst2.load(shared_data, 10, 10, 50, seed=3, system_prompt=None)[2]
    b = sst2.load(shared_data, 10, 10, 50, seed=3, system_prompt=None)[2]
    assert a == b and len(a) == 50 and a[0]["messages"][0]["role"] == "user"


def test_training_rows_alternate_labels(shared_data):
    train = sst2.load(shared_data, train_n=0, val_n=20, eval_n=10, seed=0, system_prompt="")[0]
    assert [e["label"] for e in train[:6]] == [0, 1, 0, 1, 0, 1]
    assert sum(e["label"] for e in train) * 2 == len(train)
