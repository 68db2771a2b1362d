"""The search space: bounds come from sweep.toml, the conditional structure lives here.

    params = suggest(trial, study_config)

Tested with optuna.trial.FixedTrial (tests/sweep/test_space.py).
"""

from __future__ import annotations

import optuna

from sweep.config import FloatRange, Study
from sweep.errors import ConfigError


def suggest(trial: optuna.trial.BaseTrial, study: Study) -> dict:
    """Sample one configuration: training method, base model, LoRA rank, alpha (a multiple of
    r), lr, dropout. Full fine-tuning has no rank, alpha or dropout to sample."""
    space = study.space
    method = _fixed_or_categorical(trial, "method", space.method)
    if method == "full":
        return {
            "method": method,
            "model": trial.suggest_categorical("model", list(study.models)),
            "lr": _float(trial, "lr_full", space.lr_full),  # its own: ~10x below LoRA's
        }
    r = trial.suggest_categorical("r", list(space.r))
    multiple = trial.suggest_categorical("alpha_multiple", list(space.alpha_multiple))
    return {
        "method": method,
        "model": trial.suggest_categorical("model", list(study.models)),
        "r": r,
        "lora_alpha": float(multiple * r),
        "lr": _float(trial, "lr", space.lr),
        "dropout": _float(trial, "dropout", space.dropout),
    }


def grid(study: Study) -> dict[str, list]:
    """GridSampler's search space: every combination of the study's lists (learning rate and
    dropout must be fixed). Full fine-tuning ignores r and alpha, so give it one of each."""
    space = study.space
    floats = ("lr", "lr_full", "dropout") if "full" in space.method else ("lr", "dropout")
    for name in floats:
        if not getattr(space, name).fixed:
            raise ConfigError(
                "GridSampler runs every combination of lists: fix it with a plain number "
                "(or give the sampler a search_space)",
                f"studies.{study.name}.space.{name}",
            )
    points = {"model": list(study.models), "r": list(space.r)}
    points["alpha_multiple"] = list(space.alpha_multiple)
    if len(space.method) > 1:
        points["method"] = list(space.method)
    return points


def _fixed_or_categorical(trial: optuna.trial.BaseTrial, name: str, values: tuple) -> str:
    """One value is recorded, not searched (studies from before the choice keep their space)."""
    if len(values) == 1:
        trial.set_user_attr(name, values[0])
        return values[0]
    return trial.suggest_categorical(name, list(values))


def _float(trial: optuna.trial.BaseTrial, name: str, rng: FloatRange) -> float:
    """A fixed value (a plain number in TOML) is recorded, not searched."""
    if rng.fixed:
        trial.set_user_attr(name, rng.low)
        return rng.low
    return trial.suggest_float(name, rng.low, rng.high, log=rng.log)
