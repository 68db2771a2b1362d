"""The lengths a trial's packed training batches are padded to: few enough that CUDA graphs
are captured for few shapes, where padding a batch up costs less than capturing its own.

Why: `speed.bucket_length` pads each batch to one of a few lengths per doubling (at most 12.5 %
padding), and each new length costs a capture of every decoder layer's graphs, about one eager
step of host time (0.3-0.45 s, 8 captured lengths in a 100-step 7B SQuAD trial and 12 in a 0.5B
AlpacaEval one: 2.4 s and ~5 s of their 22.6 s and 14.8 s of training, session 23,
docs/bench/README.md). Where the card's time for a step hardly grows with its tokens (a 0.5B
layer is bound by its kernels' launch and latency), a batch padded up to a longer length that
is already captured costs almost nothing; on the 7B shape each padded token costs its matmuls.
So the plan weighs the two with what this trial measured (`GraphSet.shape_costs`): the host
seconds a captured length cost, and the graphed layers' card seconds per step at each captured
length, a straight line through which prices a padded token; against how often each bucket is
expected in the steps left (the training rows' lengths drawn in batches as the trainer draws
them). Until one length is captured and timed, batches get their bucket as before. The same
shares say which new lengths are worth capturing at all (`Plan.recurs`): one the batches left
are not expected to bring again runs eagerly. Choosing the lengths is a one-dimensional
facility location (each bucket served by the shortest chosen length at or above it; a chosen
length not captured yet costs a capture), solved exactly by dynamic programming over the few
dozen sorted lengths: written here because no library in this project's stack offers it for a
handful of values.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable

from src.speed import bucket_length

SAMPLES = 4096  # batches drawn to estimate each bucket's share
# a new packed training length's graphs are captured only where the batches left are expected
# to bring it at least this many more times (or the plan chose it): a capture costs about two
# eager steps of host time on the 7B shape (0.52-0.65 s against ~0.2 s of extra per eager
# step) and holds its buffers to the trial's end (the peak, the memory objective). Measured on
# the H200 (session 25): with every length captured at its first sight once judged, a 0.5B
# AlpacaEval trial captured its one-off 1,408- and 1,536-token batches (0.57 and 0.50 s
# steps) and its training peak rose from 4.79 to 5.91 GiB
RECUR = 2.0


def bucket_shares(lengths: list[int], rows: int, seed: int = 0) -> dict[int, float]:
    """Each bucket's expected share of packed batches of `rows` rows drawn from `lengths`
    without replacement (as a shuffled epoch is cut into batches)."""
    rows = min(rows, len(lengths))
    if rows < 1:
        return {}
    rng = random.Random(seed)
    counts = Counter(bucket_length(sum(rng.sample(lengths, rows))) for _ in range(SAMPLES))
    return {length: n / SAMPLES for length, n in counts.items()}


def fitted_slope(step_s: dict[int, float]) -> float:
    """Card seconds a step spends per token in its graphed layers: the least-squares line
    through (length, seconds) where two or more lengths are timed (never below 0), else the
    one timing divided by its length (every second priced per token: the most a padded token
    can cost)."""
    if not step_s:
        return math.inf
    points = sorted(step_s.items())
    if len(points) == 1:
        length, seconds = points[0]
        return seconds / length
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    var = sum((x - mean_x) ** 2 for x, _ in points)
    cov = sum((x - mean_x) * (y - mean_y) for x, y in points)
    return max(cov / var, 0.0)


def chosen_lengths(
    shares: dict[int, float],
    captured: set[int],
    slope: float,
    capture_s: float,
    remaining: int,
) -> list[int]:
    """The lengths that serve every bucket of `shares` at the least expected cost over the
    `remaining` batches: each bucket padded to the shortest chosen length at or above it
    (`slope` seconds per padded token per batch), each chosen length not in `captured` costing
    `capture_s`. The longest bucket must be served."""
    if not shares:
        return sorted(captured)
    buckets = sorted(shares)
    top = buckets[-1]
    candidates = sorted(set(buckets) | {c for c in captured if c >= buckets[0]})
    # prefix sums over the buckets in candidate order: the expected batches up to each
    # candidate and their tokens, so a group's padding is c * batches - tokens
    weight = [shares.get(c, 0.0) * remaining for c in candidates]
    batches, tokens = [0.0], [0.0]
    for c, w in zip(candidates, weight, strict=True):
        batches.append(batches[-1] + w)
        tokens.append(tokens[-1] + w * c)
    best = [math.inf] * len(candidates)
    back = [-1] * len(candidates)
    for j, c in enumerate(candidates):
        own = 0.0 if c in captured else capture_s
        for i in range(-1, j):  # candidates[i] the chosen length below c (-1: none)
            before = 0.0 if i < 0 else best[i]
            if before == math.inf:
                continue
            padding = c * (batches[j + 1] - batches[i + 1]) - (tokens[j + 1] - tokens[i + 1])
            cost = before + own + slope * padding
            if cost < best[j]:
                best[j], back[j] = cost, i
    ends = [j for j, c in enumerate(candidates) if c >= top]
    j = min(ends, key=lambda k: best[k])
    chosen = []
    while j >= 0:
        chosen.append(candidates[j])
        j = back[j]
    return sorted(chosen)


class Plan:
    """`length(n)`: the length a packed training batch of `n` tokens is padded to.

    `lengths`: the training rows' token counts; `rows`: rows per batch (micro-batch);
    `batches`: training batches the trial runs; `costs()`: {length: (capture seconds or None,
    step seconds or None)} as measured so far (`GraphSet.shape_costs`)."""

    def __init__(self, lengths: list[int], rows: int, batches: int, costs: Callable[[], dict]):
        self.shares = bucket_shares(lengths, rows)
        self.batches, self.costs = batches, costs
        self.seen = 0  # training batches padded so far
        self.padded = 0  # of them, padded beyond their bucket
        self._key = self._chosen = None

    def length(self, n: int) -> int:
        bucket = bucket_length(n)
        self.seen += 1
        usable = self.usable()
        above = [c for c in usable if c >= bucket]
        if not above:
            return bucket
        length = min(above)
        self.padded += length > bucket
        return length

    def usable(self) -> list[int]:
        """The lengths batches may be padded to now: the chosen ones and every one captured;
        none until a captured length has its capture and step times."""
        costs = self.costs()
        captured = {n for n, (capture, _) in costs.items() if capture is not None}
        captures = sorted(c for c, _ in costs.values() if c is not None)
        step_s = {n: s for n, (_, s) in costs.items() if s is not None}
        if not captures or not step_s:
            return []
        slope = fitted_slope(step_s)
        capture_s = captures[len(captures) // 2]
        remaining = max(self.batches - self.seen + 1, 1)
        # planned again when a measurement changes or a twentieth of the batches went by
        key = (tuple(sorted(costs.items())), remaining * 20 // max(self.batches, 1))
        if key != self._key:
            self._key = key
            # never past the longest length the trial needed so far: its activations, and
            # so the peak (the memory objective), stay those of its own batches
            longest = max(captured)
            shares = {n: share for n, share in self.shares.items() if n <= longest}
            self._chosen = chosen_lengths(shares, captured, slope, capture_s, remaining)
        return sorted(set(self._chosen) | captured)

    def recurs(self, length: int) -> bool:
        """Whether a batch of `length` tokens (padded) is worth capturing graphs for now: the
        plan chose that length, or the batches after this one are expected to bring its bucket
        at least `RECUR` more times. Else its steps run eagerly."""
        if self._chosen is not None and length in self._chosen:
            return True
        return self.shares.get(length, 0.0) * max(self.batches - self.seen, 0) >= RECUR

    def summary(self) -> dict:
        """What a trial's result records: batches padded beyond their bucket, and the
        captured lengths with their measured costs (seconds)."""
        costs = {
            str(n): [None if c is None else round(c, 4), None if s is None else round(s, 5)]
            for n, (c, s) in sorted(self.costs().items())
        }
        return {"batches": self.seen, "padded_beyond_bucket": self.padded, "costs": costs}
