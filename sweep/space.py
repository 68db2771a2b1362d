"""The search space: bounds come from sweep.toml, the conditional structure lives here.

    params = suggest(trial, study_config)

Tested with optuna.trial.FixedTrial (tests/sweep/test_space.py).
"""

from __future__ import annotations

import optuna

from sweep.config import FloatRange, Study


def suggest(trial: optuna.trial.BaseTrial, study: Study) -> dict:
    """Sample one configuration: base model, LoRA rank, alpha (a multiple of r), lr, dropout."""
    space = study.space
    r = trial.suggest_categorical("r", list(space.r))
    multiple = trial.suggest_categorical("alpha_multiple", list(space.alpha_multiple))
    return {
        "model": trial.suggest_categorical("model", list(study.models)),
        "r": r,
        "lora_alpha": float(multiple * r),
        "lr": _float(trial, "lr", space.lr),
        "dropout": _float(trial, "dropout", space.dropout),
    }


def _float(trial: optuna.trial.BaseTrial, name: str, rng: FloatRange) -> float:
    """A fixed value (a plain number in TOML) is recorded, not searched."""
    if rng.fixed:
        trial.set_user_attr(name, rng.low)
        return rng.low
    return trial.suggest_float(name, rng.low, rng.high, log=rng.log)
