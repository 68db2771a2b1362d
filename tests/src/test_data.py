"""src/data.py: chat examples to token ids, one at a time or all at once."""

from __future__ import annotations

from objectives import OBJECTIVES
from src.data import IGNORE, to_dataset, tokenize
from src.models import load_tokenizer


def test_batched_tokenization_equals_one_example_at_a_time(tiny_model, shared_data):
    tokenizer = load_tokenizer(str(tiny_model))
    train, _, _ = OBJECTIVES["sst2"].load(shared_data, 64, 8, 8, 0, None)
    for max_len in (256, 12):  # 12: prompts cut from the left, answers kept
        rows = to_dataset(tokenizer, train, max_len).to_list()
        assert rows == [tokenize(tokenizer, e, max_len) for e in train]
        assert all(len(r["input_ids"]) <= max_len and r["labels"][-1] != IGNORE for r in rows)
    assert len(to_dataset(tokenizer, [], 256)) == 0
