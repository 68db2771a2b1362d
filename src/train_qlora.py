"""One trial, straight through: load → adapt → data → train → evaluate → save → result.

    python -m src.train_qlora storage/trials/<study>-<key>/<number>/spec.json
    python -m src.train_qlora --trials N -       (a warm worker: spec paths on stdin)

The sweep writes spec.json (model, sampled params, budgets, folders) and reads result.json;
progress lines go to stdout (see src/progress.py). Runs alone too, for debugging one trial.

A worker (`--trials N`) runs up to N trials one after another and keeps its imports, its CUDA
context and the loaded base model between them (`Warm`): the next trial of the same base
attaches a fresh adapter to it. A pruned trial is abandoned at its next step (SIGUSR1 from
the sweep) and the worker takes the next one; anything else that goes wrong ends the process,
as a one-trial process would end.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import gc
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

import src.deferred_compile  # noqa: F401  first: transformers imports bitsandbytes (its docstring)

# isort: split
from transformers import (
    DataCollatorForSeq2Seq,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

from objectives import OBJECTIVES
from src import cuda_graphs, fused_lora, models, profiling, shapes, speed
from src.data import to_dataset
from src.memory import GIB, PeakMemory
from src.memory import cap as memory_cap
from src.progress import ProgressCallback, emit
from src.scoring import choice_logprobs
from sweep.results import Status, TrialResult, base_key, git_state, package_versions


class Stopped(Exception):
    """The sweep pruned this trial (SIGUSR1 to a warm worker): abandon it at the next step."""


STOP = {"asked": False}  # set by the SIGUSR1 handler; read at step ends (`check_stop`)


def on_stop(signum, frame) -> None:
    STOP["asked"] = True  # just a flag: the trial unwinds at a step boundary, not mid-kernel


def check_stop() -> None:
    if STOP["asked"]:
        raise Stopped


class Warm:
    """The base model a worker keeps between trials, keyed by what its loading depends on
    (`sweep.results.base_key`). A trial takes it, attaches its own adapter, and gives it back
    with the adapter removed (PEFT's `unload`: the base modules back, their weights never
    written: LoRA trains apart from the frozen base and evaluation does not merge), the
    input-grad hook off, gradients and caches freed. Between trials the worker holds the
    base and its CUDA context; it frees them when the next trial needs another base, and at
    its exit."""

    def __init__(self):
        self.key: str | None = None
        self.held: tuple | None = None  # (model, tokenizer, source, kernels)

    def take(self, key: str | None) -> tuple | None:
        if key is not None and key == self.key and self.held is not None:
            held, self.held = self.held, None  # the trial's now; back by `give`
            return held
        if self.held is not None:  # another base: freed before this trial loads its own
            self.drop()
        return None

    def give(self, key: str | None, model, tokenizer, source: str, kernels: list) -> None:
        """Keep the base of `model` (an adapter on it, or the base itself) for the next trial."""
        if key is None:
            return
        if hasattr(model, "unload"):  # PEFT: take the LoRA layers out again
            model = model.unload()
        model.disable_input_require_grads()
        model.zero_grad(set_to_none=True)
        model.eval()  # as from_pretrained leaves it
        self.key, self.held = key, (model, tokenizer, source, kernels)

    def drop(self) -> None:
        self.key, self.held = None, None
        # the base was frozen with the rest (`serve`): collectable again. Only when one was
        # held: unfreezing on a worker's first trial would put its imports back under every
        # full collection
        gc.unfreeze()
        free_memory()


def free_memory() -> None:
    """What the last trial left: Python garbage, cuBLAS workspaces, the CUDA allocator's
    cached blocks, and the C heap's free pages (glibc keeps them, and the next trial's CPU
    peak would start on them)."""
    gc.collect()
    if torch.cuda.is_available():
        # cuBLAS keeps a workspace per stream it ran on, and each trial's CUDA graphs run on
        # streams of their own: ~64 MiB a trial that a warm worker would carry into the next
        # one's peak (measured on the H200: +0.065 GiB per trial without this)
        getattr(torch._C, "_cuda_clearCublasWorkspaces", lambda: None)()
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def main(spec_path: Path, warm: Warm | None = None) -> TrialResult:
    """Train and evaluate; out of memory ends the trial as INFEASIBLE with the memory reached.
    `warm`: the worker's kept base model (None: a process of its own)."""
    emit("start")  # imports done: the sweep times a trial's phases by these events
    spec = json.loads(Path(spec_path).read_text())
    started = time.perf_counter()
    budget = spec.get("vram_budget_gb", 0.0)
    if (fraction := memory_cap(budget)) is not None:
        emit("memory_cap", budget_gib=budget, fraction=round(fraction, 4))
    memory = PeakMemory()
    try:
        return train_and_evaluate(spec, memory, started, warm)
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


def train_and_evaluate(
    spec: dict, memory: PeakMemory, started: float, warm: Warm | None = None
) -> TrialResult:
    out_dir, train_cfg, params = Path(spec["out_dir"]), spec["train"], spec["params"]
    plain = spec.get("recipe") == "plain"  # the whole-trial benchmark's baseline
    clock = Clock()
    set_seed(train_cfg["seed"])
    speed.attention_backends(train_cfg.get("cudnn_attention", False))
    key = base_key(spec) if warm is not None else None
    base = None  # (model, tokenizer, source, kernels) of the loaded base
    if plain:
        model, tokenizer = plain_setup(spec["model"], params, train_cfg, Path(spec["cache_dir"]))
    else:
        base = warm.take(key) if warm else None
        kept = base is not None
        base = base or load(spec["model"], params, train_cfg, Path(spec["cache_dir"]))
        # the trial's memory is measured from its loaded base on: a warm worker's trial
        # (base kept) and a fresh process's (base just loaded) start from the same state
        free_memory()
        held = memory.restart()
        set_seed(train_cfg["seed"])  # the adapter's initial weights: as after a fresh load
        model, tokenizer = adapt(*base, params, train_cfg, kept, held)
    clock.lap("load")
    objective = OBJECTIVES[spec["task"]]
    data_dir = Path(spec["data_dir"]) if spec["data_dir"] else None
    rows_args = (
        data_dir,
        train_cfg["train_examples"],
        train_cfg["val_examples"],
        spec["eval"]["max_examples"],
        train_cfg["seed"],
        train_cfg["system_prompt"],
        spec.get("train_set"),
    )
    train_rows, val_rows, eval_rows = load_rows(spec["task"], *rows_args)
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
        *tokenized(spec["task"], rows_args, tokenizer, needed, max_len),
        train_cfg,
        params["lr"],
        out_dir,
        memory,
        plain,
        val_accuracy,
    )
    profiler = None
    if spec.get("profile_steps"):  # [first, count]: the whole-trial benchmark's --profile
        profiler = profiling.Steps(*spec["profile_steps"])
        trainer.add_callback(profiler)
    clock.lap("data")
    try:
        trainer.train()
        check_stop()  # pruned at its last validation: no evaluation
    except Stopped:
        speed.decompile_layers(model)
        release_training(trainer)
        if warm is not None and base is not None:
            warm.give(key, model, tokenizer, *base[2:])
        raise
    clock.lap("train_loop")
    graphs = cuda_graphs.stats(model)  # before decompiling drops them
    if trainer.shape_plan is not None:  # the lengths training batches were padded to
        graphs["plan"] = trainer.shape_plan.summary()
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
    train_peak = memory.phase()  # the objective: what the configuration needs

    emit("evaluating", examples=len(eval_rows), train_peak_gib=round(train_peak, 3))
    generation: dict = {}
    settings = eval_settings(spec) | {
        "fast_generation": False if plain else None,  # None: src/generation decides
        # evaluation stays within what training needed (CUDA; the budget caps it anyway)
        "memory_limit_bytes": int(train_peak * GIB) if memory.cuda else None,
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
        graphs=graphs,
        profile=(profiler.summary or {}) if profiler else {},
        device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        versions=package_versions(),
        git=git_state(Path(__file__).resolve().parent.parent),
    )
    result.save(out_dir / "result.json")
    if warm is not None and base is not None and not not_saved:
        warm.give(key, model, tokenizer, *base[2:])
    return result


@functools.lru_cache(maxsize=2)
def _rows(task: str, *args) -> tuple:
    return tuple(tuple(rows) for rows in OBJECTIVES[task].load(*args))


def load_rows(task: str, *args) -> tuple[list, list, list]:
    """The objective's (train, validation, evaluation) rows; a warm worker's next trial of
    the same study reuses what the last one read (lists copied, rows never changed)."""
    return tuple(list(rows) for rows in _rows(task, *args))


@functools.lru_cache(maxsize=2)
def tokenized(task: str, rows_args: tuple, tokenizer, needed: int, max_len: int) -> tuple:
    """(training, validation) datasets of `load_rows(task, *rows_args)`: the first `needed`
    training rows (shuffled: only what trains) and every validation row, tokenized; a warm
    worker's next trial with the same rows and tokenizer reuses them (the Trainer derives
    its own datasets from them, never changes them)."""
    train, val, _ = _rows(task, *rows_args)
    return to_dataset(tokenizer, list(train[:needed]), max_len), to_dataset(
        tokenizer, list(val), max_len
    )


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
    return adapt(*load(model_spec, params, train_cfg, cache_dir), params, train_cfg)


def load(model_spec: dict, params: dict, train_cfg: dict, cache_dir: Path) -> tuple:
    """(model, tokenizer, source, kernels): the base as the method loads it, with the fused
    kernels swapped in (what a warm worker keeps between trials)."""
    method = params.get("method", "qlora")
    model, tokenizer, source = models.load_base(
        model_spec, train_cfg["compute_dtype"], cache_dir, method
    )
    compile_ = train_cfg["compile"] and torch.cuda.is_available()  # CUDA only: see speed.py
    kernels = speed.fuse_kernels(model, train_cfg["kernels"], compiled=compile_)
    return model, tokenizer, source, kernels


def adapt(model, tokenizer, source: str, kernels: list, params: dict, train_cfg: dict,
          kept: bool = False, held_gib: float | None = None):  # fmt: skip
    """The trial's own part on a loaded base: LoRA (or full fine-tuning), fused LoRA,
    checkpointing, compiled or graphed layers. `kept`: the base is a warm worker's, kept from
    its last trial; `held_gib`: what the process holds with it (both said in the "model"
    event)."""
    method = params.get("method", "qlora")
    dtype = train_cfg["compute_dtype"]
    checkpointing = train_cfg["gradient_checkpointing"]
    compile_ = train_cfg["compile"] and torch.cuda.is_available()
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
    once = train_cfg["dequantize_once"]  # the [train] default (sweep/config.py) is on
    graphed = (
        cuda_graphs.install(speed.decoder_layers(model), graphs=True, dequantize_once=once)
        if graphs_on(train_cfg, method)
        else 0
    )
    emit(
        "model",
        source=source,
        base="kept" if kept else "loaded",
        **({"held_gib": round(held_gib, 3)} if held_gib is not None else {}),
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
        # the validation loss runs at the micro-batch size unless [train] val_batch_size says
        # otherwise: its activations (and logits) would set the trial's peak, an objective
        per_device_eval_batch_size=(not plain and train_cfg.get("val_batch_size")) or micro,
        gradient_accumulation_steps=train_cfg["grad_accum"] * train_cfg["batch_size"] // micro,
        learning_rate=lr,
        warmup_steps=train_cfg["warmup_ratio"],  # a float < 1 is a fraction of max_steps
        lr_scheduler_type="cosine",
        optim=train_cfg["optimizer"],  # paged AdamW; bitsandbytes falls back to non-paged on CPU
        eval_strategy="steps" if val_set is not None else "no",
        eval_steps=train_cfg["eval_every"],
        # the plain recipe logs every step as a user's would; the trial path's step losses
        # reach the curve without the Trainer's per-step wait (ProgressCallback.add_loss)
        logging_strategy="steps" if plain else "no",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=cuda and models.compute_dtype(train_cfg["compute_dtype"]) == torch.bfloat16,
        # checkpointing is already set up per layer (src/speed.py); the Trainer would redo all
        gradient_checkpointing=False,
        # padding-free batches have no padding to leave out of the count
        include_num_input_tokens_seen="non_padding" if plain or not packing else "all",
        seed=train_cfg["seed"],
        # the Trainer's NaN/inf check of every step's loss reads it on the host: a wait for
        # the backward pass, before the optimizer's ~400 launches, during which the GPU
        # idles (13-16 % of a 7B SQuAD step, torch.profiler). A NaN loss is then logged as is.
        logging_nan_inf_filter=plain,
        disable_tqdm=True,
        dataloader_pin_memory=cuda,
        # each batch's copies to the card queued behind the previous step's kernels instead of
        # waiting for them (a blocking copy from pinned memory waits for the stream), as
        # accelerate offers for pinned batches; the plain recipe keeps the defaults
        accelerator_config={"non_blocking": cuda and not plain},
    )
    progress = ProgressCallback(memory)
    plan = None
    if not plain and packing and train_cfg.get("shape_plan") and cuda_graphs.installed(model):
        shared = cuda_graphs.graph_set(model)
        plan = shapes.Plan(
            [len(ids) for ids in train_set["input_ids"]],
            micro,
            args.max_steps * args.gradient_accumulation_steps,
            shared.shape_costs,
        )
        shared.recurs = plan.recurs  # a new length's graphs captured only where it comes again
    trainer = TrialTrainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=val_set,
        # graphs replay fixed shapes: batches padded to a few lengths
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True)
        if plain
        else speed.collator(
            tokenizer,
            packing,
            cuda,
            cuda_graphs.installed(model),
            packing
            and train_cfg.get("packed_attention", False)
            and speed.install_packed_attention(),
            train_cfg.get("labelled_logits", False) and speed.keeps_logits(model),
            speed.fuses_loss(model),
            train_cfg.get("unfused_share", 0.0),
            plan,
        ),
        callbacks=[progress, StopCheck()],
    )
    trainer.val_accuracy = val_accuracy
    trainer.progress = None if plain else progress
    trainer.optimizer_waits = plain or train_cfg.get("optimizer_waits", False)
    trainer.grouped_updates = not plain and train_cfg.get("grouped_updates", False)
    trainer.shape_plan = plan
    return trainer, progress


class StopCheck(TrainerCallback):
    """A pruned trial in a warm worker ends at the next step boundary (`check_stop`)."""

    def on_step_begin(self, args, state, control, **kwargs):
        check_stop()

    def on_step_end(self, args, state, control, **kwargs):
        check_stop()


class TrialTrainer(Trainer):
    """The HF Trainer, its FLOP count (6 x tokens x parameters) from a parameter count taken
    once: the Trainer's own walks every parameter at every step, 6.6 % of a 0.5B SST-2
    trial's training loop on the H200 once the layers ran as CUDA graphs (py-spy,
    docs/bench/README.md). The Trainer's docs ask for a subclass to change it."""

    _parameters: int | None = None
    validation_seconds = 0.0  # the validation losses' share of the training loop
    val_accuracy: Callable | None = None
    optimizer_waits = True  # False: bitsandbytes' step without its per-parameter syncs
    shape_plan: shapes.Plan | None = None  # the lengths packed training batches are padded to
    grouped_updates = False  # True: bitsandbytes' step one kernel per group (speed.py)
    progress: ProgressCallback | None = None  # takes each step's loss (no Trainer logging)

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.progress is not None:
            self.progress.add_loss(loss)
        return loss

    def compute_loss(self, model, inputs, *args, **kwargs):
        """A packed row's forward without transformers' mask (`speed.maskless`)."""
        with speed.maskless(model, speed.BOUNDARIES in inputs):
            return super().compute_loss(model, inputs, *args, **kwargs)

    def create_optimizer(self, model=None):
        fresh = self.optimizer is None
        optimizer = super().create_optimizer(model)
        if fresh and not self.optimizer_waits:
            speed.without_parameter_waits(optimizer)
        # before any graph records the LoRA tensors' addresses, which grouping moves
        if fresh and self.grouped_updates and not cuda_graphs.captured(self.model):
            speed.grouped_updates(optimizer)
        return optimizer

    def evaluate(self, *args, **kwargs):
        started = time.perf_counter()
        if self.progress is not None:  # the steps' losses before their validation's
            self.progress.flush(wait=True)
        emit("validating", step=self.state.global_step)
        graphs = cuda_graphs.graph_set(self.model)
        if graphs is not None:  # its forward-only shapes captured only where they come again
            graphs.begin_pass(self.validations_left())
        collate = self.data_collator
        # labelled logits: always in validation; the padding plan (shapes.Plan): never
        if hasattr(collate, "evaluating"):
            collate.evaluating = True
        try:
            metrics = super().evaluate(*args, **kwargs)
            if self.val_accuracy is not None:
                metrics["eval_accuracy"] = self.val_accuracy(self.model)
                self.log({"eval_accuracy": metrics["eval_accuracy"]})
            return metrics
        finally:
            if hasattr(collate, "evaluating"):
                collate.evaluating = False
            self.validation_seconds += time.perf_counter() - started

    def validations_left(self) -> int | None:
        """Validations still to come after the one at this step (every `eval_steps` steps up
        to `max_steps`), or None when the Trainer does not know them (no step schedule)."""
        every, last = self.state.eval_steps, self.state.max_steps
        if not every or not last or every < 1:
            return None
        every = int(every)
        return max(0, last // every - self.state.global_step // every)

    def _track_num_input_tokens(self, inputs):
        """All tokens, counted on the host: the Trainer's own copies the count to the GPU and
        reads it back, which waits for the step's backward pass before the optimizer's
        launches can start: the GPU then idles while the host launches them (15 % of a 7B
        SQuAD step, torch.profiler, docs/bench/README.md). Non-padding counts stay the
        Trainer's (they sum a mask on the GPU)."""
        if self.args.include_num_input_tokens_seen == "all" and "input_ids" in inputs:
            self.state.num_input_tokens_seen += inputs["input_ids"].numel()
        else:
            super()._track_num_input_tokens(inputs)

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
    """A spare or warm worker (`-`): imports done, it waits for the sweep to send the spec
    path of the trial it is to run (an empty line or a closed pipe: the sweep had no more)."""
    emit("ready")
    line = sys.stdin.readline().strip()
    return Path(line) if line else None


def to_trial_log(spec_path: Path) -> None:
    """stderr into the trial's stderr.log from now on, like a process started for it."""
    sys.stderr.flush()
    log = (spec_path.parent / "stderr.log").open("w")
    os.dup2(log.fileno(), sys.stderr.fileno())
    log.close()


def serve(first: Path | None, trials: int) -> None:
    """Run `first` (or wait for a spec), then up to `trials` in all, each taken from stdin.
    A trial that ended in anything but success or pruning ends the worker with it: out of
    memory or a crash leave a process no later trial should inherit."""
    warm = Warm() if trials > 1 else None
    signal.signal(signal.SIGUSR1, on_stop)
    speed.cuda_waits(os.environ.get("SWEEP_CUDA_WAIT"))  # before the CUDA context exists
    speed.preload()
    # what lives now lives as long as the process (modules; later the kept base): frozen out
    # of the cyclic collector, whose full passes otherwise walk all of it (~0.3-0.6 s each,
    # several per trial: Accelerate's free_memory, ours)
    gc.freeze()
    path = first or wait_for_spec()
    for done in range(1, trials + 1):
        if path is None:
            return
        if first is None or done > 1:
            to_trial_log(path)
        STOP["asked"] = False  # a prune that came after the last trial ended is not this one's
        try:
            outcome = main(path, warm)
        except Stopped:
            emit("released")  # the sweep waits for this before it takes the worker back
        else:
            emit("done", status=outcome.status.value, metrics=outcome.metrics)
            if outcome.status != Status.SUCCESS:
                return
        if done == trials:
            return
        free_memory()
        gc.freeze()
        path = wait_for_spec()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m src.train_qlora")
    parser.add_argument("spec", help="spec.json of the trial, or - to read spec paths from stdin")
    parser.add_argument("--trials", type=int, default=1, help="trials this process may run")
    args = parser.parse_args()
    serve(None if args.spec == "-" else Path(args.spec), max(1, args.trials))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # everything is written: skip the interpreter's teardown (~2 s with CUDA)
