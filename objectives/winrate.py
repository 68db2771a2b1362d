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
fitted with an L1 penalty whose strength is chosen by 5-fold (grouped) cross-validation on the
soft log loss (as theirs: liblinear, no separate intercept). The fit also sees the rows of the
baseline's own length-gamed variants (verbose and concise GPT-4-turbo, weight 0.2 / 2 each,
without the bias term θ), which pull φ and ψ toward what those variants show. The
length-controlled win rate is the mean prediction with the length term set to zero.

Two of those inputs are hub files: the difficulties γ (`instruction_difficulty.csv`) and the
gamed variants' annotations (`df_gamed.csv`). Offline, from a data folder:

- γ: AlpacaEval publishes the GLM coefficients (φ_m, ψ_m, θ_m) it fitted for 200 models
  against the official γ (`alpacaeval/glm/baseline_gpt4_1106_preview.csv`). With those held
  fixed, each γ_i is a one-parameter logistic fit over every annotation file we hold for a
  model with published coefficients (`fixed_coefficient_difficulty`), on the official scale.
- gamed rows: the variants' outputs are public, their annotations are not; each row gets the
  preference that the variant's own published GLM predicts for it (`gamed_rows`). The soft
  log loss is linear in the label, so expected labels pull the fit as the real ones do on
  average.

A data folder without `alpacaeval/glm/` falls back to a joint GLM over the annotation pool
for γ (`estimate_difficulty`) and no gamed rows: a median 2.2 points off the leaderboard
instead of the figure in docs/objectives.md.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from objectives.common import open_text

ANNOTATION_POOL = "alpacaeval/annotations/weighted_alpaca_eval_gpt4_turbo"  # in a data folder

GLM = "alpacaeval/glm"  # in a data folder: AlpacaEval's published coefficients, gamed outputs
COEFFICIENTS = f"{GLM}/baseline_gpt4_1106_preview.csv"
COEFFICIENT_COLUMNS = (
    "np.tanh(std_delta_len)",
    "instruction_difficulty",
    "not_gamed_baseline.astype(float)",
)
GAMED = ("gpt4_1106_preview_verbose", "gpt4_1106_preview_concise")
GAMED_WEIGHT = 0.2 / 2  # theirs: regularize_to_baseline_lambda, split over the two variants
# what a model's length-controlled fit shares with every other model: the instruction
# difficulties and the gamed variants' rows (tanh length feature, difficulty, preference)
LCInputs = tuple[dict[str, float], np.ndarray | None]
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


def length_controlled(
    rows: Sequence[dict], difficulty: dict[str, float], gamed: np.ndarray | None = None
) -> dict:
    """The length-controlled win rate and its standard error, in percent.

    `gamed`: rows of the baseline's length-gamed variants (`gamed_rows`), or None.
    """
    rows = [r for r in rows if r.get("instruction") in difficulty]
    if not rows:
        raise ValueError("no annotated instruction has a known difficulty")
    if all((r.get("output_1") or "") == (r.get("output_2") or "") for r in rows):
        return {"length_controlled_winrate": 50.0, "lc_standard_error": 0.0}  # the baseline
    gamma = np.array([difficulty[r["instruction"]] for r in rows])
    y = preferences(rows) - 1
    keep = ~np.isnan(y)
    features = np.column_stack([length_features(rows), gamma, np.ones_like(gamma)])[keep]
    y, weight = y[keep], np.ones(int(keep.sum()))
    if gamed is not None and len(gamed):
        # theirs: pd.concat([df_gamed, df]); the gamed rows come first, without the bias
        g = np.column_stack([gamed[:, 0], gamed[:, 1], np.zeros(len(gamed))])
        features = np.concatenate([g, features])
        y = np.concatenate([gamed[:, 2], y])
        weight = np.concatenate([np.full(len(gamed), GAMED_WEIGHT), weight])
    weights = fit_soft_logistic(features, y, weight)
    test = np.column_stack([np.zeros_like(gamma), gamma, np.ones_like(gamma)])
    p = _sigmoid(test @ weights)  # what if the model's outputs were as long as the reference's
    return {
        "length_controlled_winrate": 100 * float(p.mean()),
        "lc_standard_error": 100 * float(p.std(ddof=1) / math.sqrt(p.size)),
        "glm_weights": {"length": weights[0], "difficulty": weights[1], "bias": weights[2]},
    }


def fit_soft_logistic(x: np.ndarray, y: np.ndarray, weight: np.ndarray | None = None) -> np.ndarray:
    """L1 logistic regression on soft labels y in [0, 1] with row weights, C chosen by 5-fold
    grouped CV on the weighted soft log loss (sklearn's GroupKFold, as AlpacaEval's
    LogisticRegressionCV: the mean of the folds' losses, then a refit on every row).

    sklearn takes only hard labels, so each row appears twice (label 1 weighted w·y, label 0
    weighted w·(1 - y)): the weighted log loss is then exactly the soft cross-entropy.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GroupKFold

    weight = np.ones_like(y) if weight is None else weight

    def fit(idx: np.ndarray, c: float) -> np.ndarray:
        xs = np.concatenate([x[idx], x[idx]])
        labels = np.concatenate([np.ones(idx.size), np.zeros(idx.size)])
        w = np.concatenate([weight[idx] * y[idx], weight[idx] * (1 - y[idx])])
        model = LogisticRegression(
            C=c, l1_ratio=1.0, solver="liblinear", fit_intercept=False, random_state=123
        )
        model.fit(xs, labels, sample_weight=w)
        return model.coef_[0]

    rows = np.arange(len(y))
    folds = list(GroupKFold(FOLDS).split(rows, groups=rows))
    losses = [
        np.mean(
            [
                _soft_log_loss(x[held] @ fit(train, c), y[held], weight[held])
                for train, held in folds
            ]
        )
        for c in CS
    ]
    return fit(rows, float(CS[int(np.argmin(losses))]))


def read_coefficients(path: Path) -> dict[str, np.ndarray]:
    """AlpacaEval's published GLM coefficients: model -> (length φ, difficulty ψ, bias θ)."""
    import csv

    with open(path, newline="") as f:
        table = list(csv.reader(f))
    header = table[0]
    cols = [header.index(c) for c in COEFFICIENT_COLUMNS]
    return {row[0]: np.array([float(row[c]) for c in cols]) for row in table[1:]}


def fixed_coefficient_difficulty(
    pool: dict[str, list[dict]], coefficients: dict[str, np.ndarray], l2: float = 1e-2
) -> dict[str, float]:
    """Instruction difficulties γ with the models' published coefficients held fixed.

    For every instruction, a one-parameter logistic fit of the preferences of every model in
    `pool` that has coefficients (Newton's method; a small L2 pull toward 0 keeps an
    instruction that every model loses finite). The published coefficients were fitted
    against the official γ, so the estimate is on that scale, not standardised.
    """
    index: dict[str, int] = {}
    i_ids, z0s, psis, ys = [], [], [], []
    for name, rows in pool.items():
        if name not in coefficients or not coefficients[name][1]:
            continue  # no published fit, or the baseline itself (all zeros)
        rows = [r for r in rows if r.get("preference") is not None]
        phi, psi, theta = coefficients[name]
        for r in rows:
            index.setdefault(r["instruction"], len(index))
        i_ids.append([index[r["instruction"]] for r in rows])
        z0s.append(phi * length_features(rows) + theta)
        psis.append(np.full(len(rows), psi))
        ys.append(preferences(rows) - 1)
    i_ids = np.concatenate(i_ids)
    z0, psi, y = np.concatenate(z0s), np.concatenate(psis), np.concatenate(ys)
    gamma = np.zeros(len(index))
    for _ in range(200):  # Newton's method, steps clipped to 1 (the loss is convex in each γ_i)
        p = _sigmoid(z0 + psi * gamma[i_ids])
        grad = np.bincount(i_ids, psi * (y - p), len(index)) - l2 * gamma
        hess = np.bincount(i_ids, psi * psi * p * (1 - p), len(index)) + l2
        step = np.clip(grad / hess, -1, 1)
        gamma += step
        if np.abs(step).max() < 1e-10:
            break
    return {instruction: float(gamma[k]) for instruction, k in index.items()}


def gamed_rows(
    references: dict[str, str],
    gamed_outputs: dict[str, dict[str, str]],
    coefficients: dict[str, np.ndarray],
    difficulty: dict[str, float],
) -> np.ndarray:
    """Rows (tanh length feature, γ, expected preference) of the baseline's gamed variants.

    `gamed_outputs`: variant name -> instruction -> output. The variants' annotations are
    not public; each row's label is what the variant's published GLM predicts for it.
    """
    out = []
    for name, outputs in gamed_outputs.items():
        rows = [
            {"instruction": i, "output_1": references[i], "output_2": o}
            for i, o in outputs.items()
            if i in references and i in difficulty
        ]
        tanh_len = length_features(rows)
        gamma = np.array([difficulty[r["instruction"]] for r in rows])
        phi, psi, theta = coefficients[name]
        out.append(
            np.column_stack([tanh_len, gamma, _sigmoid(phi * tanh_len + psi * gamma + theta)])
        )
    return np.concatenate(out)


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


def _soft_log_loss(z: np.ndarray, y: np.ndarray, weight: np.ndarray) -> float:
    return float(-np.mean(weight * (y * _log_sigmoid(z) + (1 - y) * _log_sigmoid(-z))))


def lc_inputs(
    pool: dict[str, list[dict]],
    coefficients: dict[str, np.ndarray],
    gamed_outputs: dict[str, dict[str, str]],
    leave_out: str | None = None,
) -> LCInputs:
    """Difficulties and gamed rows from a pool of annotation files (name -> rows) and the
    published coefficients, leaving model `leave_out`'s annotations and coefficients unused."""
    pool = {k: v for k, v in pool.items() if k != leave_out}
    coefficients = {k: v for k, v in coefficients.items() if k != leave_out}
    difficulty = fixed_coefficient_difficulty(pool, coefficients)
    references = {r["instruction"]: r["output_1"] for rows in pool.values() for r in rows}
    return difficulty, gamed_rows(references, gamed_outputs, coefficients, difficulty)


def read_pool(data_dir: Path) -> dict[str, list[dict]]:
    """The data folder's annotation files, by model name."""
    files = sorted((data_dir / ANNOTATION_POOL).glob("*.json*"))
    return {f.name.split(".json")[0]: read_annotations(f) for f in files}


def read_gamed(data_dir: Path) -> dict[str, dict[str, str]]:
    """The gamed variants' outputs in a data folder: name -> instruction -> output."""
    out = {}
    for name in GAMED:
        with open_text(data_dir / GLM / f"{name}.model_outputs.json.xz") as f:
            out[name] = {r["instruction"]: r["output"] for r in json.load(f)}
    return out


def offline_inputs(data_dir: Path, cache_dir: Path | None) -> LCInputs:
    """(difficulties, gamed rows or None) from a local data folder, cached in `cache_dir`
    under the list of files they came from."""
    glm = (data_dir / COEFFICIENTS).is_file()
    files = sorted((data_dir / ANNOTATION_POOL).glob("*.json*"))
    key = [f.name for f in files] + ([COEFFICIENTS, *GAMED] if glm else [])
    cached = cache_dir / "alpacaeval-lc-inputs.json" if cache_dir else None
    if cached and cached.is_file():
        stored = json.loads(cached.read_text())
        if stored.get("files") == key:
            gamed = stored["gamed"]
            return stored["difficulty"], None if gamed is None else np.array(gamed)
    if glm:
        coefficients = read_coefficients(data_dir / COEFFICIENTS)
        difficulty, gamed = lc_inputs(read_pool(data_dir), coefficients, read_gamed(data_dir))
    else:
        difficulty, gamed = estimate_difficulty(files), None
    if cached:
        cached.parent.mkdir(parents=True, exist_ok=True)
        listed = None if gamed is None else gamed.tolist()
        cached.write_text(json.dumps({"files": key, "difficulty": difficulty, "gamed": listed}))
    return difficulty, gamed


def leaderboard_rows(data_dir: Path) -> list[dict]:
    """Each leaderboard model's metrics from its published annotations next to the
    leaderboard's: win rate, and the LC win rate twice. "lc_left_out": the difficulties and
    gamed rows come from every *other* model's annotations and published coefficients (its
    own are unused), as for a new trial's answers; "lc_all": from all of them."""
    import csv

    board_csv = "alpacaeval/leaderboards/weighted_alpaca_eval_gpt4_turbo_leaderboard.csv"
    with open(data_dir / board_csv, newline="") as f:
        board = {row[""]: row for row in csv.DictReader(f)}
    pool = read_pool(data_dir)
    coefficients = read_coefficients(data_dir / COEFFICIENTS)
    gamed_outputs = read_gamed(data_dir)
    everyone = lc_inputs(pool, coefficients, gamed_outputs)
    out = []
    for name, rows in pool.items():
        if name not in board or not board[name]["length_controlled_winrate"]:
            continue
        left_out = lc_inputs(pool, coefficients, gamed_outputs, leave_out=name)
        out.append(
            {
                "model": name,
                "win_rate": win_rate(rows)["win_rate"],
                "board_win_rate": float(board[name]["win_rate"]),
                "lc_left_out": length_controlled(rows, *left_out)["length_controlled_winrate"],
                "lc_all": length_controlled(rows, *everyone)["length_controlled_winrate"],
                "board_lc": float(board[name]["length_controlled_winrate"]),
            }
        )
    return out


def leaderboard_check(data_dir: Path) -> str:
    """Markdown table of `leaderboard_rows` and the deviations' summary.

    python -m objectives.winrate ../shared/data
    """
    import statistics

    rows = leaderboard_rows(data_dir)
    lines = [
        "| model | win rate | leaderboard | LC, left out | LC, all | leaderboard LC "
        "| deviation, left out | deviation, all |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        out, all_, theirs = r["lc_left_out"], r["lc_all"], r["board_lc"]
        lines.append(
            f"| {r['model']} | {r['win_rate']:.2f} | {r['board_win_rate']:.2f} | {out:.2f} | "
            f"{all_:.2f} | {theirs:.2f} | {out - theirs:+.2f} | {all_ - theirs:+.2f} |"
        )
    lines.append("")
    for key, label in (("lc_left_out", "left out"), ("lc_all", "all")):
        size = [abs(r[key] - r["board_lc"]) for r in rows]
        lines.append(
            f"{len(size)} models, {label}: |LC deviation| median {statistics.median(size):.2f}, "
            f"mean {statistics.mean(size):.2f}, max {max(size):.2f}; "
            f"within 1 point: {sum(s <= 1 for s in size)}, within 2: {sum(s <= 2 for s in size)}"
        )
    worst = sorted(rows, key=lambda r: -abs(r["lc_left_out"] - r["board_lc"]))[:5]
    top = ", ".join(f"{r['model']} {r['lc_left_out'] - r['board_lc']:+.2f}" for r in worst)
    lines.append(f"worst five, left out: {top}")
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    print(leaderboard_check(Path(sys.argv[1])))
