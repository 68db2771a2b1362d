"""AlpacaEval metrics against the published leaderboard, from the published annotations."""

from __future__ import annotations

import csv
import math
import statistics

import pytest

from objectives import alpacaeval, winrate

POOL = "alpacaeval/annotations/weighted_alpaca_eval_gpt4_turbo"
BOARD = "alpacaeval/leaderboards/weighted_alpaca_eval_gpt4_turbo_leaderboard.csv"


@pytest.fixture(scope="module")
def board(shared_data):
    with open(shared_data / BOARD, newline="") as f:
        return {row[""]: row for row in csv.DictReader(f)}


@pytest.fixture(scope="module")
def annotations(shared_data):
    files = sorted((shared_data / POOL).glob("*.json*"))
    return {f.name.split(".json")[0]: winrate.read_annotations(f) for f in files}


def test_win_rate_and_counts_match_the_leaderboard(annotations, board):
    rows = [name for name in annotations if name in board]
    assert len(rows) == 57
    for name in rows:
        ours, theirs = winrate.win_rate(annotations[name]), board[name]
        assert ours["win_rate"] == pytest.approx(float(theirs["win_rate"]), abs=0.01), name
        assert ours["standard_error"] == pytest.approx(float(theirs["standard_error"]), abs=0.01), (
            name
        )
        for key in ("n_wins", "n_wins_base", "n_draws", "n_total"):
            assert ours[key] == int(float(theirs[key])), (name, key)
        assert ours["discrete_win_rate"] == pytest.approx(
            float(theirs["discrete_win_rate"]), abs=0.01
        ), name


def test_hand_made_preferences():
    rows = [{"preference": p, "output_2": "x"} for p in (1.0, 2.0, 1.5, 0, None, 1.8)]
    result = winrate.win_rate(rows)
    # None dropped; 0 is a draw: x = 0, 1, .5, .5, .8
    assert result["win_rate"] == pytest.approx(56.0)
    assert (result["n_total"], result["n_draws"], result["n_wins"]) == (5, 2, 2)
    assert result["discrete_win_rate"] == pytest.approx(100 * (2 + 1) / 5)
    with pytest.raises(ValueError):
        winrate.win_rate([{"preference": None}])


def test_length_controlled_win_rate_against_the_leaderboard(annotations, board, shared_data):
    """Offline difficulty estimate and no gamed-baseline regularisation: not exact.

    Measured: median |deviation| 2.2 points, 13 of 57 within 1 point, worst 25 (gpt4_gamed);
    docs/objectives.md has the table. This guards those figures against regressions.
    """
    difficulty = alpacaeval.difficulty(shared_data, None)
    assert len(difficulty) == 805
    deviations = {}
    for name, rows in annotations.items():
        if name in board and board[name]["length_controlled_winrate"]:
            lc = winrate.length_controlled(rows, difficulty)["length_controlled_winrate"]
            deviations[name] = lc - float(board[name]["length_controlled_winrate"])
    size = sorted(abs(d) for d in deviations.values())
    assert deviations["gpt4_1106_preview"] == 0  # the baseline against itself: 50 by definition
    assert statistics.median(size) < 2.5, deviations
    assert sum(d <= 1 for d in size) >= 12, deviations
    # the ranking is what a sweep uses: rank correlation with the published LC rates
    names = sorted(deviations)
    ours = [deviations[n] + float(board[n]["length_controlled_winrate"]) for n in names]
    theirs = [float(board[n]["length_controlled_winrate"]) for n in names]
    assert _spearman(ours, theirs) > 0.95


def _spearman(a: list[float], b: list[float]) -> float:
    def ranks(x):
        order = sorted(range(len(x)), key=x.__getitem__)
        r = [0] * len(x)
        for rank, i in enumerate(order):
            r[i] = rank
        return r

    ra, rb = ranks(a), ranks(b)
    n = len(a)
    return 1 - 6 * sum((p - q) ** 2 for p, q in zip(ra, rb, strict=True)) / (n * (n * n - 1))


def test_preference_is_symmetric_in_the_order_shown():
    from objectives.judges import preference_from_logprobs

    # the judge says "m" (first shown) with p = 0.8
    lp_m, lp_big = math.log(0.8), math.log(0.2)
    assert preference_from_logprobs(lp_m, lp_big, swapped=False) == pytest.approx(1.2)
    assert preference_from_logprobs(lp_m, lp_big, swapped=True) == pytest.approx(1.8)
    assert preference_from_logprobs(-math.inf, 0.0, swapped=False) == pytest.approx(2.0)
