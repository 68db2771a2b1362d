"""Runs the configured AlpacaEval judge inside the trial process (objectives/judges.py).

The local judge scores AlpacaEval's prompt with a Hugging Face model: the log-probabilities of
the labels "m" and "M" as the next token (src/scoring.py), in both orders, averaged.
"""

from __future__ import annotations

from pathlib import Path

from objectives import judges
from src.scoring import choice_logprobs


def run_judge(judge: dict, records: list[dict], model, tokenizer, settings: dict) -> list:
    name = judge["name"]
    kwargs = {k: v for k, v in judge.items() if k != "name"}
    if name == "openai":
        return judges.openai_judge(records, **kwargs)
    if name == "local":
        other = settings.get("judge_model")  # another model than the one trained
        if other or not hasattr(model, "disable_adapter"):  # or fully fine-tuned: its base
            from src import models

            judge_model, judge_tok, _ = models.load_base(
                other or settings["model"], "auto", Path(settings["cache_dir"])
            )
            return local_judge(judge_model, judge_tok, records, settings["batch_size"])
        with model.disable_adapter():  # the trial's base model, adapter switched off
            return local_judge(model, tokenizer, records, settings["batch_size"])
    return judges.plugged_in(name)(records, **kwargs)


def local_judge(model, tokenizer, records: list[dict], batch_size: int) -> list[float]:
    """Pairwise preference from label log-probabilities, both orders averaged."""
    prompts = []
    for r in records:
        for first, second in ((r["output_1"], r["output_2"]), (r["output_2"], r["output_1"])):
            messages = judges.judge_messages(r["instruction"], first, second)
            prompts.append({"messages": messages, "choices": list(judges.LABELS)})
    scores = choice_logprobs(model, tokenizer, prompts, batch_size)
    out = []
    for k in range(len(records)):
        reference_first = judges.preference_from_logprobs(*scores[2 * k], swapped=False)
        model_first = judges.preference_from_logprobs(*scores[2 * k + 1], swapped=True)
        out.append((reference_first + model_first) / 2)
    return out


def agreement(model_spec: dict, cache_dir: Path, annotation_file: Path, n: int, seed: int) -> dict:
    """How often the local judge agrees with a file's (GPT-4-turbo) preferences.

    python -m src.judge smollm2-135m ANNOTATIONS.json.xz --n 40
    """
    import random

    from objectives import winrate
    from src import models

    rows = [r for r in winrate.read_annotations(annotation_file) if r.get("preference")]
    rows = random.Random(seed).sample(rows, min(n, len(rows)))
    model, tokenizer, _ = models.load_base(model_spec, "auto", cache_dir)
    ours = local_judge(model, tokenizer, rows, batch_size=4)
    theirs = [float(r["preference"]) for r in rows]
    decided = [(a, b) for a, b in zip(ours, theirs, strict=True) if b != 1.5]
    same_side = sum((a > 1.5) == (b > 1.5) for a, b in decided)
    return {
        "n": len(rows),
        "agreement": same_side / len(decided),
        "judge_mean_preference": sum(ours) / len(ours),
        "judge_min": min(ours),
        "judge_max": max(ours),
        "reference_win_rate": 100 * sum(t - 1 for t in theirs) / len(theirs),
        "majority_baseline": max(sum(b > 1.5 for _, b in decided), sum(b < 1.5 for _, b in decided))
        / len(decided),
    }


if __name__ == "__main__":
    import argparse
    import json

    from sweep import config
    from sweep.trial import model_spec

    parser = argparse.ArgumentParser(description=agreement.__doc__)
    parser.add_argument("model", help="model alias in sweep.toml")
    parser.add_argument("annotations", type=Path)
    parser.add_argument("--n", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--config", type=Path, default=Path("sweep.toml"))
    args = parser.parse_args()
    cfg = config.load(args.config)
    spec = model_spec(cfg.models[args.model])
    print(json.dumps(agreement(spec, cfg.storage.cache, args.annotations, args.n, args.seed)))
