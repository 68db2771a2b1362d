"""AlpacaEval 2 metrics from pairwise annotations: win rate, its standard error, and the
length-controlled win rate (Dubois et al., 2024, "Length-Controlled AlpacaEval").

An annotation compares `output_1` (the reference, gpt4_1106_preview in AlpacaEval 2) with
`output_2` (the model); `preference` is in [1, 2]: 1 + P(the model's output is better).
0 (an old encoding) and 1.5 are draws; a missing preference is dropped.

Length control, written after the paper and `alpaca_eval/metrics/glm_winrate.py` (their code
downloads its inputs from the hub, so it cannot run offline). Per model, a logistic GLM with
soft labels

    P(model wins on instruction i) = σ(φ·tanh(Δlen_i / sd(Δlen)) + ψ·γ_i + θ)

Δlen = len(reference) - len(model output) in characters, γ_i the instruction's difficulty,
fitted with an L1 penalty whose strength is chosen by 5-fold cross-validation on the soft log
loss (as theirs: liblinear, no separate intercept). The length-controlled win rate is the mean
prediction with the length term set to zero. Their GLM is also pulled toward the baseline's
own length-gamed variants (`df_gamed.csv`, hub-only, weight 0.2); that term is not reproduced
here, which is one source of the deviations reported in docs/alpacaeval.md.

Instruction difficulties γ: AlpacaEval fits them once on its leaderboard models and publishes
`instruction_difficulty.csv` on the hub. Offline, `estimate_difficulty` fits the same kind of
model jointly on a pool of annotation files (every model m, instruction i):
σ(θ_m + φ_m·tanh(len_mi) + ψ_m·γ_i), by L-BFGS with a small L2 penalty, and returns γ
standardised (mean 0, sd 1; the per-model GLM absorbs any affine change of γ).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from objectives.common import open_text

ANNOTATION_POOL = "alpacaeval/annotations/weighted_alpaca_eval_gpt4_turbo"  # in a data folder

CS = np.logspace(-4, 4, 10)  # inverse L1 strengths tried, as sklearn's LogisticRegressionCV
FOLDS = 5


def read_annotations(path: Path) -> list[dict]:
    """A JSON list of annotation records (plain or .xz)."""
    with open_text(path) as f:
        rows = json.load(f)
    if not isinstance(rows, list):
        raise ValueError("expected a JSON list of annotation records")
    return rows


def preferences(rows: Sequence[dict]) -> np.ndarray:
    """Preferences as floats in [1, 2]; draws (0) become 1.5, missing ones NaN."""
    out = []
    for r in rows:
        p = r.get("preference")
        out.append(math.nan if p is None else 1.5 if float(p) == 0 else float(p))
    return np.array(out, dtype=float)


def win_rate(rows: Sequence[dict]) -> dict:
    """AlpacaEval's head-to-head numbers, in percent (as its leaderboard CSVs)."""
    prefs = preferences(rows)
    prefs = prefs[~np.isnan(prefs)]
    if prefs.size == 0:
        raise ValueError("no annotation has a preference")
    x = prefs - 1
    n = x.size
    n_draws = int((prefs == 1.5).sum())
    decided = np.rint(prefs)  # 1 or 2 once draws are set aside
    n_wins_discrete = int(((decided == 2) & (prefs != 1.5)).sum())
    return {
        "win_rate": 100 * float(x.mean()),
        "standard_error": 100 * float(x.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan,
        "n_wins": int((x > 0.5).sum()),
        "n_wins_base": int((x < 0.5).sum()),
        "n_draws": n_draws,
        "n_total": n,
        "discrete_win_rate": 100 * (n_wins_discrete + n_draws / 2) / n,
        "avg_length": int(np.mean([len(r.get("output_2") or "") for r in rows])),
    }


def length_features(rows: Sequence[dict]) -> np.ndarray:
    """tanh of the standardised length difference (reference minus model), per row."""
    delta = np.array(
        [len(r.get("output_1") or "") - len(r.get("output_2") or "") for r in rows], dtype=float
    )
    sd = delta.std(ddof=1) if delta.size > 1 else 0.0
    return np.tanh(delta / sd) if sd > 0 else np.zeros_like(delta)


def length_controlled(rows: Sequence[dict], difficulty: dict[str, float]) -> dict:
    """The length-controlled win rate and its standard error, in percent."""
    rows = [r for r in rows if r.get("instruction") in difficulty]
    if not rows:
        raise ValueError("no annotated instruction has a known difficulty")
    if all((r.get("output_1") or "") == (r.get("output_2") or "") for r in rows):
        return {"length_controlled_winrate": 50.0, "lc_standard_error": 0.0}  # the baseline
    tanh_len = length_features(rows)
    gamma = np.array([difficulty[r["instruction"]] for r in rows])
    y = preferences(rows) - 1
    keep = ~np.isnan(y)
    features = np.column_stack([tanh_len, gamma, np.ones_like(gamma)])
    weights = fit_soft_logistic(features[keep], y[keep])
    test = features.copy()
    test[:, 0] = 0.0  # what if the model's outputs were as long as the reference's
    p = _sigmoid(test @ weights)
    return {
        "length_controlled_winrate": 100 * float(p.mean()),
        "lc_standard_error": 100 * float(p.std(ddof=1) / math.sqrt(p.size)),
        "glm_weights": {"length": weights[0], "difficulty": weights[1], "bias": weights[2]},
    }


def fit_soft_logistic(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """L1 logistic regression on soft labels y in [0, 1], C chosen by 5-fold CV.

    sklearn takes only hard labels, so each row appears twice (label 1 weighted y, label 0
    weighted 1 - y): the weighted log loss is then exactly the soft cross-entropy.
    """
    from sklearn.linear_model import LogisticRegression

    def fit(idx: np.ndarray, c: float) -> np.ndarray:
        xs = np.concatenate([x[idx], x[idx]])
        labels = np.concatenate([np.ones(idx.size), np.zeros(idx.size)])
        weight = np.concatenate([y[idx], 1 - y[idx]])
        model = LogisticRegression(
            C=c, l1_ratio=1.0, solver="liblinear", fit_intercept=False, random_state=123
        )
        model.fit(xs, labels, sample_weight=weight)
        return model.coef_[0]

    folds = np.array_split(np.arange(len(y)), FOLDS)
    losses = []
    for c in CS:
        loss = 0.0
        for held in folds:
            train = np.setdiff1d(np.arange(len(y)), held)
            loss += _soft_log_loss(x[held] @ fit(train, c), y[held]) * held.size
        losses.append(loss)
    return fit(np.arange(len(y)), float(CS[int(np.argmin(losses))]))


def estimate_difficulty(annotation_files: Sequence[Path], l2: float = 1e-3) -> dict[str, float]:
    """Instruction difficulties from a pool of annotation files (see the module docstring)."""
    from scipy.optimize import minimize

    index: dict[str, int] = {}
    m_ids, i_ids, lens, ys = [], [], [], []
    for m, path in enumerate(annotation_files):
        rows = [r for r in read_annotations(path) if r.get("preference") is not None]
        if all(r.get("output_1") == r.get("output_2") for r in rows):
            continue  # the reference against itself says nothing
        for r in rows:
            index.setdefault(r["instruction"], len(index))
        m_ids += [m] * len(rows)
        i_ids += [index[r["instruction"]] for r in rows]
        lens.append(length_features(rows))
        ys.append(preferences(rows) - 1)
    m_ids, i_ids = np.array(m_ids), np.array(i_ids)
    tanh_len, y = np.concatenate(lens), np.concatenate(ys)
    n_m, n_i, n = len(annotation_files), len(index), len(y)

    # initial difficulty: how often the reference wins the instruction, across models
    wins = np.bincount(i_ids, weights=y, minlength=n_i) / np.bincount(i_ids, minlength=n_i)
    gamma0 = -np.log(np.clip(wins, 1e-3, 1 - 1e-3) / (1 - np.clip(wins, 1e-3, 1 - 1e-3)))
    gamma0 = (gamma0 - gamma0.mean()) / gamma0.std()
    start = np.concatenate([np.zeros(n_m), np.zeros(n_m), -np.ones(n_m), gamma0])

    def loss_and_grad(w: np.ndarray) -> tuple[float, np.ndarray]:
        theta, phi, psi, gamma = np.split(w, [n_m, 2 * n_m, 3 * n_m])
        z = theta[m_ids] + phi[m_ids] * tanh_len + psi[m_ids] * gamma[i_ids]
        p = _sigmoid(z)
        loss = -np.sum(y * _log_sigmoid(z) + (1 - y) * _log_sigmoid(-z)) / n
        loss += l2 * (psi @ psi + gamma @ gamma)
        dz = (p - y) / n
        grad = np.concatenate(
            [
                np.bincount(m_ids, dz, n_m),
                np.bincount(m_ids, dz * tanh_len, n_m),
                np.bincount(m_ids, dz * gamma[i_ids], n_m) + 2 * l2 * psi,
                np.bincount(i_ids, dz * psi[m_ids], n_i) + 2 * l2 * gamma,
            ]
        )
        return loss, grad

    fitted = minimize(loss_and_grad, start, jac=True, method="L-BFGS-B", options={"maxiter": 2000})
    gamma = fitted.x[3 * n_m :]
    gamma = (gamma - gamma.mean()) / gamma.std()
    return {instruction: float(gamma[k]) for instruction, k in index.items()}


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0, -z))


def _log_sigmoid(z: np.ndarray) -> np.ndarray:
    return -np.logaddexp(0, -z)


def _soft_log_loss(z: np.ndarray, y: np.ndarray) -> float:
    return float(-np.mean(y * _log_sigmoid(z) + (1 - y) * _log_sigmoid(-z)))


def offline_difficulty(data_dir: Path, cache_dir: Path | None) -> dict[str, float]:
    """Instruction difficulties estimated from the annotation pool of a local data folder
    (`estimate_difficulty`), cached in `cache_dir` under the list of files they came from."""
    files = sorted((data_dir / ANNOTATION_POOL).glob("*.json*"))
    cached = cache_dir / "alpacaeval-difficulty.json" if cache_dir else None
    key = [f.name for f in files]
    if cached and cached.is_file():
        stored = json.loads(cached.read_text())
        if stored.get("files") == key:
            return stored["difficulty"]
    values = estimate_difficulty(files)
    if cached:
        cached.parent.mkdir(parents=True, exist_ok=True)
        cached.write_text(json.dumps({"files": key, "difficulty": values}))
    return values


def leaderboard_check(data_dir: Path) -> str:
    """Markdown table: these metrics from the published annotations vs the leaderboard CSV.

    python -m objectives.winrate ../shared/data
    """
    import csv
    import statistics

    board_csv = "alpacaeval/leaderboards/weighted_alpaca_eval_gpt4_turbo_leaderboard.csv"
    with open(data_dir / board_csv, newline="") as f:
        board = {row[""]: row for row in csv.DictReader(f)}
    gamma = offline_difficulty(data_dir, None)
    lines = [
        "| model | win rate | leaderboard | LC win rate | leaderboard LC | LC deviation |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    deviations = []
    for path in sorted((data_dir / ANNOTATION_POOL).glob("*.json*")):
        name = path.name.split(".json")[0]
        if name not in board or not board[name]["length_controlled_winrate"]:
            continue
        rows = read_annotations(path)
        wr = win_rate(rows)["win_rate"]
        lc = length_controlled(rows, gamma)["length_controlled_winrate"]
        lc_board = float(board[name]["length_controlled_winrate"])
        deviations.append(lc - lc_board)
        lines.append(
            f"| {name} | {wr:.2f} | {float(board[name]['win_rate']):.2f} | {lc:.2f} | "
            f"{lc_board:.2f} | {lc - lc_board:+.2f} |"
        )
    size = [abs(d) for d in deviations]
    lines.append(
        f"\n{len(size)} models: |LC deviation| median {statistics.median(size):.2f}, "
        f"mean {statistics.mean(size):.2f}, max {max(size):.2f}; "
        f"within 1 point: {sum(s <= 1 for s in size)}, within 2: {sum(s <= 2 for s in size)}"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    print(leaderboard_check(Path(sys.argv[1])))
