"""The lengths packed training batches are padded to (src/shapes.py)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from src import shapes, speed


def _cost(shares, captured, slope, capture_s, remaining, chosen) -> float:
    """What `chosen_lengths` minimizes, for a given choice (inf where a bucket is unserved)."""
    total = capture_s * len(set(chosen) - captured)
    for bucket, share in shares.items():
        above = [c for c in chosen if c >= bucket]
        if not above:
            return math.inf
        total += slope * share * remaining * (min(above) - bucket)
    return total


@settings(max_examples=200, deadline=None)
@given(
    buckets=st.lists(st.integers(1, 40).map(lambda k: 64 * k), min_size=1, max_size=6, unique=True),
    weights=st.lists(st.floats(0.01, 1.0), min_size=6, max_size=6),
    captured=st.sets(st.integers(1, 44).map(lambda k: 64 * k), max_size=3),
    slope=st.floats(0.0, 1e-3),
    capture_s=st.floats(0.01, 1.0),
    remaining=st.integers(1, 500),
)
def test_chosen_lengths_cost_no_more_than_any_other_choice(
    buckets, weights, captured, slope, capture_s, remaining
):
    """The dynamic programme against every subset of the candidate lengths."""
    shares = dict(zip(buckets, weights, strict=False))
    args = (shares, captured, slope, capture_s, remaining)
    chosen = shapes.chosen_lengths(*args)
    best = _cost(*args, chosen)
    assert best < math.inf
    candidates = sorted(set(buckets) | {c for c in captured if c >= min(buckets)})
    for k in range(1, len(candidates) + 1):
        for other in itertools.combinations(candidates, k):
            assert best <= _cost(*args, other) + 1e-9 * (1 + abs(best))


def test_free_padding_captures_one_length_and_dear_padding_every_bucket():
    shares = {1024: 0.2, 1152: 0.3, 1280: 0.3, 1536: 0.2}
    assert shapes.chosen_lengths(shares, set(), 0.0, 0.4, 100) == [1536]
    assert shapes.chosen_lengths(shares, set(), 1.0, 0.4, 100) == [1024, 1152, 1280, 1536]
    # a rare bucket rides on a captured longer length; a frequent one gets its own
    rare = {1792: 0.02, 1920: 0.49, 2048: 0.49}
    assert shapes.chosen_lengths(rare, {1920, 2048}, 1e-4, 0.3, 100) == [1920, 2048]
    often = {1792: 0.5, 1920: 0.5}
    assert shapes.chosen_lengths(often, {1920}, 1e-4, 0.3, 100) == [1792, 1920]


def test_fitted_slope():
    assert shapes.fitted_slope({}) == math.inf
    assert shapes.fitted_slope({1000: 0.2}) == pytest.approx(2e-4)  # all of it per token
    assert shapes.fitted_slope({1000: 0.07, 2000: 0.07}) == 0.0
    assert shapes.fitted_slope({1000: 0.08, 2000: 0.07}) == 0.0  # never below 0
    assert shapes.fitted_slope({1000: 0.1, 2000: 0.2, 3000: 0.3}) == pytest.approx(1e-4)


def test_bucket_shares_are_those_of_batches_drawn_without_replacement():
    shares = shapes.bucket_shares([100] * 8, 8)  # one possible batch: 800 tokens
    assert shares == {speed.bucket_length(800): 1.0}
    shares = shapes.bucket_shares([10, 1000] * 50, 2)
    assert sum(shares.values()) == pytest.approx(1.0)
    assert set(shares) == {speed.bucket_length(n) for n in (20, 1010, 2000)}


def test_plan_pads_to_a_captured_length_once_it_is_measured():
    """Rows of 200 tokens in batches of 8: every batch 1,600 tokens, bucket 1,664."""
    costs: dict = {}
    plan = shapes.Plan([200] * 40, 8, 100, lambda: costs)
    assert plan.length(1600) == 1664  # nothing measured: its bucket, as without a plan
    costs.update({1024: (0.4, 0.07), 1280: (0.4, 0.07)})  # padding free, but all shorter:
    assert plan.length(1600) == 1664  # never past the longest length captured (the peak)
    costs.clear()
    costs[2048] = (None, None)  # capturing: not every layer yet
    assert plan.length(1600) == 1664
    # captured and timed, its step priced all per token: padding ~100 batches by 384 tokens
    # costs more than capturing 1,664
    costs[2048] = (0.4, 0.07)
    assert plan.length(1600) == 1664
    costs[1024] = (0.4, 0.07)  # a second length as fast: padding is free
    assert plan.length(1600) == 2048
    assert plan.length(2100) == speed.bucket_length(2100)  # above every captured length
    summary = plan.summary()
    assert summary["batches"] == 6 and summary["padded_beyond_bucket"] == 1
    assert summary["costs"]["2048"] == [0.4, 0.07]


def test_a_new_length_is_captured_only_where_the_batches_left_bring_it_again():
    """`Plan.recurs`, what `GraphSet.again` asks before capturing a new packed training length:
    a bucket of 90 % of the batches, yes while at least `RECUR` of the batches left are
    expected to be it; a bucket of 1 %, no (1 expected in 100: its steps run eagerly); a length
    the plan chose to pad to (to be captured), yes however rare its own bucket."""
    costs: dict = {}
    plan = shapes.Plan([200] * 40, 8, 100, lambda: costs)
    plan.shares = {1024: 0.9, 1536: 0.01, 1664: 0.015}
    assert plan.recurs(1024) and not plan.recurs(1536) and not plan.recurs(2048)
    plan.seen = 98  # 2 batches left: 1.8 expected
    assert not plan.recurs(1024)
    plan.seen = 0
    # 1,664 padded up to the captured 2,048 costs ~1.5 batches x 384 tokens x 1 s per token:
    # more than its capture, so the plan chooses it
    costs[2048] = (0.4, 2048.0)
    plan.length(1000)
    assert 1664 in plan.usable() and plan.recurs(1664)


class _Lengths:
    def __init__(self):
        self.asked = []

    def length(self, n: int) -> int:
        self.asked.append(n)
        return n + 100


def test_padding_free_pads_training_batches_to_the_plan_and_validation_to_buckets(tiny_model):
    """A packed training batch goes to the plan's length (padding labelled IGNORE, its
    positions restarting), a validation batch to its bucket; the trainer's `evaluating`
    switch reaches the inner collator through `LabelledLogits`."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    lengths = _Lengths()
    collate = speed.collator(tokenizer, True, False, bucket=True, labelled=True, lengths=lengths)
    features = [
        {"input_ids": list(range(5, 5 + n)), "labels": [-100] * (n - 2) + [7, 8]} for n in (30, 50)
    ]
    batch = collate(features)
    assert lengths.asked == [80]
    assert batch["input_ids"].shape == (1, 180)
    assert (batch["position_ids"][0, 80:] == torch.arange(100)).all()
    assert (batch["labels"] == -100).sum() > 0
    collate.evaluating = True
    batch = collate(features)
    assert lengths.asked == [80] and batch["input_ids"].shape == (1, speed.bucket_length(80))
    collate.evaluating = False
    collate(features)
    assert lengths.asked == [80, 80]
