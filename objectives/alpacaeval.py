"""AlpacaEval 2: instruction tuning, then answers to AlpacaEval's instructions judged against
the GPT-4-turbo reference outputs (win rate, standard error, length-controlled win rate).

Training: an Alpaca-format instruction set (instruction [+ input] → output), the model's chat
template, loss on the response only. Offline: `data.train_set` inside the data folder
(default alpaca/alpaca_data_5000.json.xz); hub: tatsu-lab/alpaca. Evaluation: greedy answers
(at most eval.max_new_tokens) to a seeded subset of the 805 instructions (eval.max_examples),
saved in AlpacaEval's model-outputs format, judged by eval.judge (objectives/judges.py).
If the judge cannot be reached the metric is missing and the sweep falls back to the
validation loss, recording why on the trial (never silently).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from objectives import judges, winrate
from objectives.common import chat, generate_answers, open_text, split_train_val, subset

METRIC = "win_rate"
DIRECTION = "maximize"
DEFAULT_TRAIN_SET = "alpaca/alpaca_data_5000.json.xz"
LOCAL_FILES = (
    "alpacaeval/alpaca_eval.jsonl",
    f"alpacaeval/model_outputs/{judges.REFERENCE}.json.xz",
)
ANNOTATION_POOL = winrate.ANNOTATION_POOL
HUB_TRAIN = "tatsu-lab/alpaca"
MIN_LC_ROWS = 10
HUB_EVAL = ("tatsu-lab/alpaca_eval", "alpaca_eval_gpt4_baseline.json")  # reference outputs


def preflight(data_dir: Path | None, judge: dict) -> tuple[str, str] | None:
    """The judge's prompt (openai, local) and, offline, the annotation files that the
    length-controlled win rate's instruction difficulties are estimated from: both are read
    after training and generation, so a missing one would cost a whole trial."""
    if judge["name"] in ("openai", "local") and (problem := judges.prompt_problem()):
        return problem, "eval.judge"
    if data_dir is not None and not any((data_dir / ANNOTATION_POOL).glob("*.json*")):
        return (
            f"data directory {data_dir} has no annotation files in {ANNOTATION_POOL} "
            "(the length-controlled win rate's instruction difficulties come from them)",
            "data.dir",
        )
    return None


def eval_set(data_dir: Path | None) -> str:
    return "AlpacaEval 805 instructions (a seeded subset of eval.max_examples) vs gpt4_turbo"


def load(
    data_dir: Path | None,
    train_n: int,
    val_n: int,
    eval_n: int,
    seed: int,
    system_prompt: str | None,
    train_set: str | None = None,
) -> tuple[list[dict], list[dict], list[dict]]:
    rows = _read_train(data_dir, train_set)
    train, val = split_train_val([r for r in rows if r["output"].strip()], train_n, val_n, seed)
    references = subset(read_references(data_dir), eval_n, seed)
    evaluation = [
        {
            "messages": chat(r["instruction"], system_prompt),
            "instruction": r["instruction"],
            "reference": r["output"],
            "dataset": r.get("dataset", ""),
        }
        for r in references
    ]
    return (
        [example(r, system_prompt) for r in train],
        [example(r, system_prompt) for r in val],
        (evaluation),
    )


def example(row: dict, system_prompt: str | None) -> dict:
    user = row["instruction"].strip()
    if row.get("input", "").strip():
        user += "\n\n" + row["input"].strip()
    return {"messages": chat(user, system_prompt), "answer": row["output"].strip()}


def read_references(data_dir: Path | None) -> list[dict]:
    """The 805 instructions with gpt4_1106_preview's outputs (AlpacaEval 2's reference)."""
    if data_dir is None:
        from huggingface_hub import hf_hub_download

        path = Path(hf_hub_download(HUB_EVAL[0], HUB_EVAL[1], repo_type="dataset"))
    else:
        path = data_dir / LOCAL_FILES[1]
    with open_text(path) as f:
        return json.load(f)


def lc_inputs(data_dir: Path | None, cache_dir: Path | None) -> winrate.LCInputs:
    """Instruction difficulties and the gamed baselines' rows for the length-controlled win
    rate (see objectives/winrate.py).

    Offline: from the data folder (annotation pool, published GLM coefficients, the gamed
    variants' outputs), cached in `cache_dir`. Hub: AlpacaEval's own
    instruction_difficulty.csv and df_gamed.csv.
    """
    if data_dir is None:
        import csv

        import numpy as np
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(HUB_EVAL[0], "instruction_difficulty.csv", repo_type="dataset")
        with open(path, newline="") as f:  # an index column, then the difficulty (row order)
            values = [float(row[-1]) for row in list(csv.reader(f))[1:]]
        references = read_references(None)
        difficulty = {r["instruction"]: v for r, v in zip(references, values, strict=True)}
        path = hf_hub_download(HUB_EVAL[0], "df_gamed.csv", repo_type="dataset")
        with open(path, newline="") as f:  # preference already in [0, 1] (theirs concatenates)
            rows = list(csv.DictReader(f))
        gamed = np.array(
            [
                [
                    math.tanh(float(r["std_delta_len"])),
                    float(r["instruction_difficulty"]),
                    float(r["preference"]),
                ]
                for r in rows
                if r["preference"] not in ("", "nan")
            ]
        )
        return difficulty, gamed
    return winrate.offline_inputs(data_dir, cache_dir)


def metrics(annotations: list[dict], inputs: winrate.LCInputs | None) -> dict:
    """win_rate, standard_error, counts and (given `lc_inputs`) the length-controlled rate.

    The length-controlled rate needs at least MIN_LC_ROWS annotations (its GLM is fitted with
    5-fold cross-validation); below that it is left out, not guessed.
    """
    out = winrate.win_rate(annotations)
    if inputs and len(annotations) >= MIN_LC_ROWS:
        lc = winrate.length_controlled(annotations, *inputs)
        out |= {k: v for k, v in lc.items() if k != "glm_weights"}
    return out


def evaluate(model, tokenizer, examples: list[dict], settings: dict, out_dir: Path) -> dict:
    texts = generate_answers(model, tokenizer, examples, settings)
    generator = f"{out_dir.parent.name}-trial-{out_dir.name}"
    outputs = [
        {
            "instruction": e["instruction"],
            "output": t.strip(),
            "generator": generator,
            "dataset": e["dataset"],
        }
        for e, t in zip(examples, texts, strict=True)
    ]
    (out_dir / "model_outputs.json").write_text(json.dumps(outputs, indent=1))
    records = pair_records(outputs, {e["instruction"]: e["reference"] for e in examples})
    settings.get("on_phase", lambda name: None)("judging")
    try:
        prefs = run_judge(settings["judge"], records, model, tokenizer, settings)
    except judges.JudgeUnavailable as err:
        return {"win_rate": None, "judge_error": str(err), "eval_examples": len(examples)}
    annotations = judges.annotate(records, prefs, settings["judge"]["name"])
    (out_dir / "annotations.json").write_text(json.dumps(annotations, indent=1))
    data_dir = Path(settings["data_dir"]) if settings.get("data_dir") else None
    cache = Path(settings["cache_dir"]) if settings.get("cache_dir") else None
    return metrics(annotations, lc_inputs(data_dir, cache)) | {"eval_examples": len(examples)}


def run_judge(judge: dict, records: list[dict], model, tokenizer, settings: dict) -> list:
    """The configured judge's preferences (objectives/judges.py), in the trial process."""
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
            return judges.local_judge(judge_model, judge_tok, records, settings["batch_size"])
        with model.disable_adapter():  # the trial's base model, adapter switched off
            return judges.local_judge(model, tokenizer, records, settings["batch_size"])
    return judges.plugged_in(name)(records, **kwargs)


def pair_records(outputs: list[dict], references: dict[str, str]) -> list[dict]:
    """Model outputs paired with the reference outputs of the same instructions."""
    return [
        {
            "instruction": o["instruction"],
            "output_1": references[o["instruction"]],
            "generator_1": judges.REFERENCE,
            "output_2": o["output"],
            "generator_2": o.get("generator", "model"),
            "dataset": o.get("dataset", ""),
        }
        for o in outputs
    ]


def _read_train(data_dir: Path | None, train_set: str | None) -> list[dict]:
    if data_dir is None:
        from datasets import load_dataset

        return list(load_dataset(train_set or HUB_TRAIN, split="train"))
    path = data_dir / (train_set or DEFAULT_TRAIN_SET)
    if path.suffix in (".jsonl",):
        with open_text(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    with open_text(path) as f:
        return json.load(f)
