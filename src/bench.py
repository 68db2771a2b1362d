"""The plain QLoRA recipe against the trial path: each recipe in its own process, alternating.

    python -m src.bench BENCH.json prepare       the checkpoint, the card and its matrix rate
    python -m src.bench BENCH.json INDEX ROUND   one recipe of BENCH.json's list, measured

`python -m sweep bench` writes BENCH.json, runs these, and reads what they write back.

Plain recipe: what people run without this project: Transformers + PEFT + bitsandbytes NF4
double quantization, bf16 compute, SDPA, `prepare_model_for_kbit_training` (which upcasts the
non-quantized weights to fp32), activation checkpointing on every layer, paged AdamW 8-bit,
LoRA on all linear layers, the HF Trainer — the recipe of the issue's reference figures
(../shared/device/README.md: 3,826-3,900 tokens/s for the 7B shape), whose Trainer runs
without bf16 autocast, so the upcast head and norms compute in fp32. `plain+autocast` (CUDA
only) is the same with the Trainer's `bf16=True`: the stronger baseline, reported beside it.
Trial path: src/train_qlora's `setup` and `build_trainer` with the study's [train] table (and
a variant's overrides). Random tokens of a fixed length: throughput and memory do not depend
on the values.

One process per recipe and round, as a sweep runs one per trial: the peak memory (allocator
and NVML) is that recipe's alone. In one shared process, every recipe of a second round
peaked ~1.1 GiB higher than in the first (docs/bench/README.md, session 7).

Correctness on the same batch and LoRA weights: each recipe as it trains (bf16), and each
recipe built again with fp32 compute on the same 4-bit weights, where rounding no longer hides
a wrong gradient (in bf16, plain itself is ~9 % from fp32 at 7B on random weights).
"""

from __future__ import annotations

import gc
import json
import statistics
import sys
import time
import zlib
from pathlib import Path

import torch
from datasets import Dataset
from transformers import (
    DataCollatorForSeq2Seq,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

from src import models, profiling, random_qwen, speed, train_qlora
from src.memory import PeakMemory
from src.progress import emit

LR = 2e-4


class StepTimer(TrainerCallback):
    """Wall time of every optimizer step, the GPU drained at both ends."""

    def __init__(self):
        self.times: list[float] = []
        self._t0 = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        _sync()
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        _sync()
        self.times.append(time.perf_counter() - self._t0)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def plain_trainer(
    model, tokenizer, dataset, batch: int, steps: int, out: Path, autocast: bool = True
) -> Trainer:
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=batch,
        learning_rate=LR,
        optim="paged_adamw_8bit",
        bf16=autocast and torch.cuda.is_available(),  # the Trainer's bf16 autocast
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True)
    return Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator)


def trial_path(
    source: str, r: int, alpha: float, dropout: float, train_cfg: dict, out: Path, dataset
) -> tuple:
    model, tokenizer = trial_model(source, r, alpha, dropout, train_cfg, out)
    trainer, _ = train_qlora.build_trainer(model, tokenizer, dataset, None, train_cfg, LR, out)
    return model, trainer


def trial_model(source: str, r: int, alpha: float, dropout: float, train_cfg: dict, out: Path):
    """(model, tokenizer) as a trial's `setup` builds them for these LoRA parameters."""
    params = {"method": "qlora", "r": r, "lora_alpha": alpha, "dropout": dropout}
    return train_qlora.setup(model_spec(source), params, train_cfg, out / "cache")


def model_spec(folder: str) -> dict:
    """A [models] entry for a local folder, as a trial's spec.json holds it."""
    return models.folder_spec(folder)


def loss_and_grads(model, batch: torch.Tensor, autocast: bool = True) -> tuple[float, dict]:
    """Loss and LoRA gradients on one batch, every recipe starting from the same LoRA weights
    (seeded per parameter name; B is random too, or A's gradient would be zero) and without
    dropout, whose random masks would differ. Afterwards B is zero again, as LoRA starts."""
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for name, param in trainable.items():
        gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        param.data.copy_(torch.randn(param.shape, generator=gen) * 0.02)
    model.train()
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    for module in dropouts:
        module.eval()
    cuda = torch.cuda.is_available()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda and autocast):
        loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    grads = {n: p.grad.float().cpu() for n, p in trainable.items()}
    model.zero_grad(set_to_none=True)
    for module in dropouts:
        module.train()
    for name, param in trainable.items():
        if "lora_B" in name:
            param.data.zero_()
    return float(loss.detach()), grads


def compare(want: tuple[float, dict], got: tuple[float, dict]) -> dict:
    (loss_a, grads_a), (loss_b, grads_b) = want, got
    assert grads_a.keys() == grads_b.keys(), "the recipes train different parameters"
    errors = [float((grads_b[n] - grads_a[n]).norm() / grads_a[n].norm()) for n in grads_a]
    flat_a = torch.cat([grads_a[n].flatten() for n in grads_a])
    flat_b = torch.cat([grads_b[n].flatten() for n in grads_a])
    return {
        "grad_rel_err": float((flat_b - flat_a).norm() / flat_a.norm()),  # all LoRA gradients
        "loss_plain": loss_a,
        "loss_trial": loss_b,
        "loss_rel_diff": abs(loss_b - loss_a) / abs(loss_a),
        "grad_rel_err_max": max(errors),
        "grad_rel_err_median": statistics.median(errors),
        "lora_tensors": len(errors),
    }


def measure(recipe: dict, bench: dict, dataset, check_batch) -> tuple[dict, tuple[float, dict]]:
    """One recipe from load to its last step: times, peak memory, and the check batch as the
    recipe trains (its dtype and autocast)."""
    memory = PeakMemory()
    set_seed(0)
    train_cfg = recipe["train"]  # None: a plain recipe
    r, source, out = bench["rank"], bench["model_dir"], Path(bench["work_dir"])
    alpha, dropout, steps = 2 * r, bench["dropout"], bench["warmup"] + bench["steps"]
    started = time.perf_counter()
    # attention kernels as each recipe gets them: torch's default (cuDNN allowed) for plain,
    # the trial's setting for the trial path (its own process sets it in train_qlora)
    speed.attention_backends((train_cfg or {}).get("cudnn_attention", True))
    if train_cfg is None:
        model = models.plain_lora(source, r, alpha, dropout)
        tokenizer = models.load_tokenizer(source)
        trainer = plain_trainer(
            model, tokenizer, dataset, bench["batch"], steps, out, recipe["autocast"]
        )
    else:
        model, trainer = trial_path(source, r, alpha, dropout, train_cfg, out, dataset)
    setup_s = time.perf_counter() - started
    check = loss_and_grads(model, check_batch, recipe["autocast"])
    timer = StepTimer()
    trainer.add_callback(timer)
    trainer.train()
    recorded, kind, nvml = memory.read()
    micro = (train_cfg or {}).get("micro_batch") or bench["batch"]  # after the memory figures
    profiled = profile(model, check_batch.repeat(micro, 1)) if bench.get("profile") else None
    speed.decompile_layers(model)  # frees CUDA graphs before the fp32 check builds its model
    median = statistics.median(timer.times[bench["warmup"] :])
    tokens = bench["batch"] * bench["seq"]
    row = {
        "variant": recipe["name"],
        "recipe": "plain" if train_cfg is None else "trial",
        "setup_s": setup_s,
        "step_s_median": median,
        "step_s": timer.times,
        "tokens_per_s": tokens / median,
        "mfu": tokens / median * 6 * bench["n_params"] / (bench["matmul_tflops"] * 1e12)
        if bench["matmul_tflops"]
        else None,
        "peak_allocated_gib": memory.allocated_gib,
        "peak_reserved_gib": memory.reserved_gib,
        "recorded_peak_gib": recorded,
        "memory_kind": kind,
        "profile": profiled,
        "nvml_peak_gib": nvml,
        "final_loss": final_loss(trainer),
    }
    del trainer, model
    return row, check


def final_loss(trainer) -> float | None:
    """The last step's training loss: the trial path keeps its curve in its ProgressCallback
    (no Trainer logging), the plain recipe in the Trainer's log."""
    progress = getattr(trainer, "progress", None)  # a TrialTrainer of the trial path
    if progress is not None and progress.curve["train"]:
        return progress.curve["train"][-1][2]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return losses[-1] if losses else None


def fp32_check(bench: dict, check_batch, train_cfg: dict | None) -> tuple[float, dict]:
    """The check batch through the recipe built again with fp32 compute on the same 4-bit
    weights (the trial path keeps its kernels, fused LoRA and CUDA graphs): bf16 rounding
    through many random-weight layers no longer hides whether both compute the same thing."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    r, source = bench["rank"], bench["model_dir"]
    if train_cfg is None:
        model = models.plain_lora(source, r, 2 * r, bench["dropout"], torch.float32)
    else:
        train_cfg = {**train_cfg, "compute_dtype": "float32"}
        out = Path(bench["work_dir"])
        model, _ = trial_model(source, r, 2 * r, bench["dropout"], train_cfg, out)
    return loss_and_grads(model, check_batch, autocast=False)


def profile(model, batch: torch.Tensor) -> dict:
    """One forward and backward under torch.profiler: GPU time by kernel category against the
    wall time (the rest is the GPU waiting for the CPU to launch work)."""

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            model(input_ids=batch, labels=batch).loss.backward()
        model.zero_grad(set_to_none=True)

    model.train()
    step()
    _sync()
    with profiling.Window() as window:
        step()
    return window.summary


def matmul_tflops(n: int = 8192, iters: int = 30) -> float | None:
    """The card's bf16 matrix rate measured here (the MFU denominator); None on the CPU."""
    if not torch.cuda.is_available():
        return None
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    _sync()
    started = time.perf_counter()
    for _ in range(iters):
        a @ b
    _sync()
    rate = 2 * n**3 * iters / (time.perf_counter() - started) / 1e12
    del a, b
    torch.cuda.empty_cache()
    return rate


def random_tokens(vocab: int, count: int, seq: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randint(100, vocab - 100, (count, seq), generator=gen)


def inputs(bench: dict) -> tuple:
    """The training set (random tokens, the same in every process) and the check batch: one
    sequence, so that the check never sets the peak."""
    steps = bench["warmup"] + bench["steps"]
    ids = random_tokens(bench["vocab"], steps * bench["batch"], bench["seq"])
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    return dataset, ids[:1].to("cuda" if torch.cuda.is_available() else "cpu")


def prepare(bench_path: Path) -> None:
    """The checkpoint (built where missing) and what every recipe needs to know of the card,
    written back into BENCH.json."""
    bench = json.loads(bench_path.read_text())
    model_dir = Path(bench["model_dir"])
    if not (model_dir / "config.json").exists():
        emit("building", shape=bench["shape"], folder=str(model_dir))
        random_qwen.build(bench["shape"], Path(bench["tokenizer"]), model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    bench["vocab"] = config["vocab_size"]
    bench["n_params"] = random_qwen.count(config)
    bench["matmul_tflops"] = matmul_tflops()
    bench["cuda"] = torch.cuda.is_available()
    bench["device"] = torch.cuda.get_device_name() if bench["cuda"] else "cpu"
    bench_path.write_text(json.dumps(bench, indent=2))


def run_recipe(bench_path: Path, index: int, round_: int) -> None:
    """One recipe in this process; writes its row (in the first round with its checks against
    plain, the first recipe, whose check batch results it leaves for the others)."""
    bench = json.loads(bench_path.read_text())
    recipe, work = bench["recipes"][index], Path(bench["work_dir"])
    dataset, check_batch = inputs(bench)
    row, check = measure(recipe, bench, dataset, check_batch)
    row["round"] = round_
    if round_ == 0:
        # on the CPU the recipes compute in fp32 already (models.compute_dtype)
        cpu_fp32 = models.compute_dtype("auto") == torch.float32
        fp32 = check if cpu_fp32 else fp32_check(bench, check_batch, recipe["train"])
        if index == 0:  # plain: its results stay for the recipes after it
            plain = {"as_trained": check, "fp32": fp32}
            torch.save(plain, work / "check-plain.pt")
        else:
            plain = torch.load(work / "check-plain.pt")
        row["checks"] = {
            "as_trained": compare(plain["as_trained"], check) if index else None,
            "fp32": compare(plain["fp32"], fp32) if index else None,
            "vs_fp32_plain": compare(plain["fp32"], check),  # what its rounding costs
        }
    (work / f"run-{round_}-{index}.json").write_text(json.dumps(row))


if __name__ == "__main__":
    path, step = Path(sys.argv[1]), sys.argv[2:]
    if step == ["prepare"]:
        prepare(path)
    else:
        run_recipe(path, int(step[0]), int(step[1]))
