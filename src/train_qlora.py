"""One trial, straight through: load → adapt → data → train → evaluate → save → result.

    python -m src.train_qlora storage/trials/<study>-<key>/<number>/spec.json

The sweep writes spec.json (model, sampled params, budgets, folders) and reads result.json;
progress lines go to stdout (see src/progress.py). Runs alone too, for debugging one trial.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments, set_seed

from objectives import OBJECTIVES
from src import cuda_graphs, fused_lora, models, speed
from src.data import to_dataset
from src.memory import PeakMemory
from src.memory import cap as memory_cap
from src.progress import ProgressCallback, emit
from src.scoring import choice_logprobs
from sweep.results import Status, TrialResult, git_state, package_versions


def main(spec_path: Path) -> TrialResult:
    """Train and evaluate; out of memory ends the trial as INFEASIBLE with the memory reached."""
    emit("start")  # imports done: the sweep times a trial's phases by these events
    spec = json.loads(Path(spec_path).read_text())
    started = time.perf_counter()
    budget = spec.get("vram_budget_gb", 0.0)
    if (fraction := memory_cap(budget)) is not None:
        emit("memory_cap", budget_gib=budget, fraction=round(fraction, 4))
    memory = PeakMemory()
    try:
        return train_and_evaluate(spec, memory, started)
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as err:
        if not is_out_of_memory(err):
            raise
        peak, kind, nvml = memory.read()
        peak = max(peak, memory.phase_peak or 0.0)  # the memory reached, in either phase
        emit("oom", peak_gib=peak)
        result = TrialResult(
            status=Status.INFEASIBLE,
            error=f"oom: {type(err).__name__}: {str(err)[:500]}",
            peak_memory_gib=peak,
            memory_kind=kind,
            nvml_peak_gib=nvml,
            wall_seconds=time.perf_counter() - started,
            device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            versions=package_versions(),
        )
        result.save(Path(spec["out_dir"]) / "result.json")
        return result


def is_out_of_memory(err: BaseException) -> bool:
    """CUDA OOM, Python's MemoryError, or the CPU allocator failing (a RuntimeError)."""
    if isinstance(err, (torch.OutOfMemoryError, MemoryError)):
        return True
    return "can't allocate memory" in str(err) or "out of memory" in str(err).lower()


def train_and_evaluate(spec: dict, memory: PeakMemory, started: float) -> TrialResult:
    out_dir, train_cfg, params = Path(spec["out_dir"]), spec["train"], spec["params"]
    plain = spec.get("recipe") == "plain"  # the whole-trial benchmark's baseline
    clock = Clock()
    set_seed(train_cfg["seed"])
    speed.attention_backends(train_cfg.get("cudnn_attention", False))
    if plain:
        model, tokenizer = plain_setup(spec["model"], params, train_cfg, Path(spec["cache_dir"]))
    else:
        model, tokenizer = setup(spec["model"], params, train_cfg, Path(spec["cache_dir"]))
    clock.lap("load")
    objective = OBJECTIVES[spec["task"]]
    data_dir = Path(spec["data_dir"]) if spec["data_dir"] else None
    train_rows, val_rows, eval_rows = objective.load(
        data_dir,
        train_cfg["train_examples"],
        train_cfg["val_examples"],
        spec["eval"]["max_examples"],
        train_cfg["seed"],
        train_cfg["system_prompt"],
        spec.get("train_set"),
    )
    emit("data", train=len(train_rows), val=len(val_rows), eval=len(eval_rows))

    max_len = train_cfg["max_seq_len"]
    needed = train_cfg["max_steps"] * train_cfg["batch_size"] * train_cfg["grad_accum"]
    if train_cfg.get("val_accuracy") and val_rows and hasattr(objective, "accuracy"):
        val_accuracy = partial(
            choice_accuracy, objective.accuracy, tokenizer, val_rows, spec["eval"]["batch_size"]
        )
    else:
        val_accuracy = None
    trainer, progress = build_trainer(
        model,
        tokenizer,
        to_dataset(tokenizer, train_rows[:needed], max_len),  # shuffled: only what trains
        to_dataset(tokenizer, val_rows, max_len),
        train_cfg,
        params["lr"],
        out_dir,
        memory,
        plain,
        val_accuracy,
    )
    clock.lap("data")
    trainer.train()
    clock.lap("train_loop")
    speed.decompile_layers(model)
    try:  # before evaluation: never lost to it
        save_weights(model, tokenizer, out_dir, params)
        not_saved = ""
    except OSError as err:  # disk full, folder removed: still measured, then stored as FAIL
        not_saved = f"adapter not saved: {err}"
        emit("save_failed", error=str(err))
    clock.lap("saving")
    # real tokens: without the padding that gives CUDA graphs fixed shapes
    tokens = int(trainer.state.num_input_tokens_seen) - getattr(trainer.data_collator, "padding", 0)
    val_losses = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    steps = trainer.state.global_step
    release_training(trainer)
    train_peak, train_reserved = memory.phase()  # the objective: what the configuration needs

    emit("evaluating", examples=len(eval_rows), train_peak_gib=round(train_peak, 3))
    generation: dict = {}
    settings = eval_settings(spec) | {
        "fast_generation": False if plain else None,  # None: src/generation decides
        # evaluation stays within what training needed (CUDA; the budget caps it anyway)
        "memory_limit_bytes": train_reserved or None,
        "generation_stats": generation,
        "on_phase": lambda name: emit("phase", name=name),  # e.g. judging (the live view)
    }
    metrics = objective.evaluate(model, tokenizer, eval_rows, settings, out_dir)
    clock.lap("evaluation")
    eval_peak, kind, nvml = memory.read()
    trainable, total = models.count_params(model)
    phases = clock.phases | {
        "training": progress.train_seconds,
        "validation": trainer.validation_seconds,
        "generation": generation.get("seconds", 0.0),
    }
    result = TrialResult(
        status=Status.FAILED if not_saved else Status.SUCCESS,
        error=not_saved,
        metrics=metrics,
        peak_memory_gib=train_peak,
        eval_peak_memory_gib=eval_peak,
        memory_kind=kind,
        nvml_peak_gib=nvml,
        trainable_params=trainable,
        total_params=total,
        train_tokens=tokens,
        train_tokens_per_s=tokens / progress.train_seconds if progress.train_seconds else 0.0,
        train_seconds=progress.train_seconds,
        wall_seconds=time.perf_counter() - started,
        steps=steps,
        last_val_loss=val_losses[-1] if val_losses else None,
        phases={k: round(v, 3) for k, v in phases.items()},
        generation=generation,
        curve=progress.curve,
        device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        versions=package_versions(),
        git=git_state(Path(__file__).resolve().parent.parent),
    )
    result.save(out_dir / "result.json")
    return result


class Clock:
    """Seconds per phase of the trial, each from the end of the one before."""

    def __init__(self):
        self.phases: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.phases[name] = now - self._last
        self._last = now


def save_weights(model, tokenizer, out_dir: Path, params: dict) -> Path:
    """The adapter (LoRA: its weights only) or the fully fine-tuned model, as safetensors,
    with the tokenizer."""
    weights = out_dir / ("model" if params.get("method") == "full" else "adapter")
    model.save_pretrained(weights)
    tokenizer.save_pretrained(weights)
    emit("saved", folder=weights.name)
    return weights


def release_training(trainer) -> None:
    """Free what only training needed (optimizer state, gradients, the Trainer's and
    Accelerate's references to them, cached blocks), so evaluation starts from the model
    alone and its peak is its own."""
    trainer.model.zero_grad(set_to_none=True)
    trainer.optimizer = trainer.lr_scheduler = None
    trainer.accelerator.free_memory()  # drops its references; gc + empty_cache
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def eval_settings(spec: dict) -> dict:
    """The [eval] table plus what objectives that judge or cache need from the spec."""
    return {
        **spec["eval"],
        "data_dir": spec["data_dir"],
        "cache_dir": spec["cache_dir"],
        "judge_model": spec.get("judge_model"),
        "model": spec["model"],  # a fully fine-tuned model has no adapter to switch off
    }


def setup(model_spec: dict, params: dict, train_cfg: dict, cache_dir: Path):
    """qlora: base in 4-bit NF4, then LoRA with the sampled rank, alpha and dropout; lora: the
    same on a 16-bit base; full: every weight of the 16-bit base trains. Fused kernels and
    selective checkpointing as the [train] table says (src/speed.py)."""
    method = params.get("method", "qlora")
    dtype = train_cfg["compute_dtype"]
    checkpointing = train_cfg["gradient_checkpointing"]
    model, tokenizer, source = models.load_base(model_spec, dtype, cache_dir, method)
    compile_ = train_cfg["compile"] and torch.cuda.is_available()  # CUDA only: see speed.py
    kernels = speed.fuse_kernels(model, train_cfg["kernels"], compiled=compile_)
    if method == "full":
        model.config.use_cache = False
        if checkpointing:
            speed.checkpointing(model)
    else:
        model = models.add_lora(
            model,
            params["r"],
            params["lora_alpha"],
            params["dropout"],
            train_cfg["target_modules"],
            checkpointing,
        )
    fused = fused_lora.fuse_lora(model) if train_cfg["fused_lora"] and method != "full" else 0
    recomputed = (
        speed.checkpoint_share(model, train_cfg["checkpoint_share"]) if checkpointing else 0
    )
    compiled = speed.compile_layers(model, compile_)
    graphed = (
        cuda_graphs.install(speed.decoder_layers(model), graphs=True)
        if graphs_on(train_cfg, method)
        else 0
    )
    emit(
        "model",
        source=source,
        method=method,
        dtype=str(models.compute_dtype(dtype)).removeprefix("torch."),
        kernels=kernels,
        fused_lora_layers=fused,
        checkpointed_layers=recomputed,
        compiled_layers=compiled,
        graphed_layers=graphed,
    )
    return model, tokenizer


def plain_setup(model_spec: dict, params: dict, train_cfg: dict, cache_dir: Path):
    """The plain recipe (src/models.plain_lora) on the trial's model and LoRA parameters, for
    the whole-trial benchmark (`python -m sweep bench --whole-trial`)."""
    source = models.model_source(model_spec["id"], model_spec["path"], model_spec["package"],
                                 model_spec["gguf_file"], cache_dir)  # fmt: skip
    model = models.plain_lora(
        source,
        params["r"],
        params["lora_alpha"],
        params["dropout"],
        models.compute_dtype(train_cfg["compute_dtype"]),
    )
    emit("model", source=source, method="qlora", recipe="plain")
    return model, models.load_tokenizer(source)


def graphs_on(train_cfg: dict, method: str) -> bool:
    """CUDA graphs over the checkpointed layers: asked for, on CUDA, with checkpointing, for
    adapters. Full fine-tuning keeps eager layers: each graph holds static gradients of every
    weight of its layer, a second copy of the model's gradients per batch shape."""
    return bool(
        train_cfg.get("cuda_graphs")
        and train_cfg["gradient_checkpointing"]
        and method != "full"
        and torch.cuda.is_available()
    )


def build_trainer(
    model,
    tokenizer,
    train_set,
    val_set,
    train_cfg: dict,
    lr: float,
    out_dir: Path,
    memory: PeakMemory | None = None,
    plain: bool = False,
    val_accuracy: Callable | None = None,
) -> tuple[Trainer, ProgressCallback]:
    """HF Trainer over tokenized datasets; `train_cfg["micro_batch"]` splits each batch into
    micro-batches with gradient accumulation (same optimizer steps, less activation memory).
    `plain`: the plain recipe's padded batches (the whole-trial benchmark's baseline).
    `val_accuracy(model)`: logged as eval_accuracy after every validation loss."""
    cuda = torch.cuda.is_available()
    packing = train_cfg["packing"]
    micro = train_cfg["micro_batch"] or train_cfg["batch_size"]
    args = TrainingArguments(
        output_dir=str(out_dir / "hf"),
        max_steps=train_cfg["max_steps"],
        per_device_train_batch_size=micro,
        # the validation loss runs at the micro-batch size: full-vocabulary logits of a
        # larger batch would set the trial's peak memory, which is an objective
        per_device_eval_batch_size=micro,
        gradient_accumulation_steps=train_cfg["grad_accum"] * train_cfg["batch_size"] // micro,
        learning_rate=lr,
        warmup_steps=train_cfg["warmup_ratio"],  # a float < 1 is a fraction of max_steps
        lr_scheduler_type="cosine",
        optim=train_cfg["optimizer"],  # paged AdamW; bitsandbytes falls back to non-paged on CPU
        eval_strategy="steps" if val_set is not None else "no",
        eval_steps=train_cfg["eval_every"],
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=cuda and models.compute_dtype(train_cfg["compute_dtype"]) == torch.bfloat16,
        # checkpointing is already set up per layer (src/speed.py); the Trainer would redo all
        gradient_checkpointing=False,
        # padding-free batches have no padding to leave out of the count
        include_num_input_tokens_seen="non_padding" if plain or not packing else "all",
        seed=train_cfg["seed"],
        disable_tqdm=True,
        dataloader_pin_memory=cuda,
    )
    progress = ProgressCallback(memory)
    trainer = TrialTrainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=val_set,
        # graphs replay fixed shapes: batches padded to a few lengths
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True)
        if plain
        else speed.collator(tokenizer, train_cfg["packing"], cuda, cuda_graphs.installed(model)),
        callbacks=[progress],
    )
    trainer.val_accuracy = val_accuracy
    return trainer, progress


class TrialTrainer(Trainer):
    """The HF Trainer, its FLOP count (6 x tokens x parameters) from a parameter count taken
    once: the Trainer's own walks every parameter at every step, 6.6 % of a 0.5B SST-2
    trial's training loop on the H200 once the layers ran as CUDA graphs (py-spy,
    docs/bench/README.md). The Trainer's docs ask for a subclass to change it."""

    _parameters: int | None = None
    validation_seconds = 0.0  # the validation losses' share of the training loop
    val_accuracy: Callable | None = None

    def evaluate(self, *args, **kwargs):
        started = time.perf_counter()
        emit("validating", step=self.state.global_step)
        try:
            metrics = super().evaluate(*args, **kwargs)
            if self.val_accuracy is not None:
                metrics["eval_accuracy"] = self.val_accuracy(self.model)
                self.log({"eval_accuracy": metrics["eval_accuracy"]})
            return metrics
        finally:
            self.validation_seconds += time.perf_counter() - started

    def floating_point_ops(self, inputs: dict) -> int:
        if "input_ids" not in inputs or not hasattr(self.model, "num_parameters"):
            return super().floating_point_ops(inputs)
        if self._parameters is None:
            self._parameters = self.model.num_parameters(exclude_embeddings=True)
        return 6 * inputs["input_ids"].numel() * self._parameters


def choice_accuracy(accuracy: Callable, tokenizer, rows: list[dict], batch: int, model) -> float:
    """Accuracy of a choice task (sst2's `accuracy`) on `rows`, the validation rows: one
    forward pass each (single-token answers), scored as the final evaluation scores."""
    scores = choice_logprobs(model, tokenizer, rows, batch)
    return accuracy(scores, [r["label"] for r in rows])


def wait_for_spec() -> Path | None:
    """A spare trial process (`-`): started ahead with its imports done, it waits for the
    sweep to send the spec path of the trial it is to run (nothing: the sweep had no more)."""
    speed.preload()
    emit("ready")
    line = sys.stdin.readline().strip()
    if not line:
        return None
    spec_path = Path(line)
    log = (spec_path.parent / "stderr.log").open("w")
    os.dup2(log.fileno(), sys.stderr.fileno())  # from now on, like a trial started for it
    return spec_path


if __name__ == "__main__":
    path = wait_for_spec() if sys.argv[1] == "-" else Path(sys.argv[1])
    if path is not None:
        outcome = main(path)
        emit("done", status=outcome.status.value, metrics=outcome.metrics)
        sys.stderr.flush()
        os._exit(0)  # everything is written: skip the interpreter's teardown (~2 s with CUDA)
