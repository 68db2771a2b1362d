"""A synthetic learning-curve table, shaped like `sweep curves` output."""

import math
import random


def synthetic_table(n=60, steps=60, eval_every=10, seed=0, extra_seeds=(1, 2)):
    rng = random.Random(seed)
    space = {
        "method": ["qlora"],
        "r": [4, 8, 16, 32, 64],
        "alpha_multiple": [0.5, 1.0, 2.0, 4.0],
        "lr": {"low": 1e-5, "high": 3e-3, "log": True, "fixed": False},
        "lr_full": {"low": 1e-6, "high": 1e-4, "log": True, "fixed": False},
        "dropout": {"low": 0.0, "high": 0.1, "log": False, "fixed": False},
    }

    def run(params, number, storage, noise_seed):
        nr = random.Random(noise_seed)
        # quality peaks at lr*alpha_multiple ~ 1e-3; rank helps a little
        x = math.log10(params["lr"] * params["alpha_multiple"]) + 3
        quality = max(0.0, 1 - 0.35 * x * x) + 0.01 * math.log2(params["r"])
        final = min(0.95, 0.5 + 0.43 * quality + nr.gauss(0, 0.004))
        speed = min(1.0, params["lr"] * params["alpha_multiple"] / 1e-3)
        tokens, total = [], 0
        for _ in range(steps):
            total += 16 * 40 + nr.randint(-40, 40)
            tokens.append(total)
        val = []
        for s in range(eval_every, steps + 1, eval_every):
            progress = 1 - math.exp(-3 * speed * s / steps)
            loss = 2.0 - 1.6 * quality * progress + nr.gauss(0, 0.01)
            val.append([s, round(loss, 5), round(0.5 + (final - 0.5) * progress, 4)])
        return {
            "number": number,
            "seed": storage,
            "params": params,
            "final": final,
            "peak_gib": 1.0 + 0.01 * params["r"],
            "tokens": tokens,
            "train_loss": [2.0] * steps,
            "val": val,
            "storage": storage,
            "seconds": {"wall": 30, "train": 10, "validation": 3, "start": 8, "finish": 9},
        }

    runs = []
    for i in range(n):
        params = {
            "r": rng.choice(space["r"]),
            "alpha_multiple": rng.choice(space["alpha_multiple"]),
            "lr": math.exp(rng.uniform(math.log(1e-5), math.log(3e-3))),
            "dropout": rng.uniform(0, 0.1),
        }
        runs.append(run(params, i, 0, i))
    best = sorted(runs, key=lambda r: -r["final"])[:5]
    for k in extra_seeds:
        for j, r in enumerate(best):
            runs.append(run(r["params"], j, k, 1000 * k + j))
    return {
        "study": "sst2-curves",
        "task": "sst2",
        "metric": "accuracy",
        "models": ["smollm2-135m"],
        "space": space,
        "train": {
            "max_steps": steps,
            "batch_size": 16,
            "eval_every": eval_every,
            "val_examples": 256,
        },
        "cost": {
            "tokens_per_s": 4000.0,
            "validation_s": 0.3,
            "start_s": 8.0,
            "finish_s": 5.0,
            "from_trials": [0, 1, 2],
        },
        "command": "synthetic",
        "runs": runs,
    }
