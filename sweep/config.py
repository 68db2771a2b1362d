"""One typed config tree, read from `sweep.toml`.

`[defaults]` is merged under every `[studies.<name>]` (tables merge key by key), then the
result is checked into frozen dataclasses. Every error names the TOML key it is about, e.g.
`studies.squad.space.lr: low must be < high`. Relative paths resolve against the folder of
the config file, never the shell's working directory.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import os
import tomllib
from pathlib import Path
from typing import Any

from objectives import OBJECTIVES
from sweep.errors import ConfigError, did_you_mean, unknown

DATA_DIR_ENV = "SWEEP_DATA_DIR"


@dataclasses.dataclass(frozen=True)
class FloatRange:
    low: float
    high: float
    log: bool = False
    fixed: bool = False  # written as a plain number in TOML: not searched


@dataclasses.dataclass(frozen=True)
class Space:
    """Search-space bounds; the conditional structure lives in `sweep/space.py`."""

    # qlora: 4-bit NF4 base + LoRA; lora: 16-bit base + LoRA; full: every weight trained
    method: tuple[str, ...] = ("qlora",)
    r: tuple[int, ...] = (4, 8, 16, 32, 64)  # LoRA rank candidates
    alpha_multiple: tuple[float, ...] = (1.0, 2.0)  # lora_alpha = multiple * r
    lr: FloatRange = FloatRange(1e-5, 5e-4, log=True)  # learning rate, log-uniform
    lr_full: FloatRange = FloatRange(1e-6, 1e-4, log=True)  # full fine-tuning's own lr
    dropout: FloatRange = FloatRange(0.0, 0.1)  # LoRA dropout, uniform


@dataclasses.dataclass(frozen=True)
class Component:
    """An Optuna sampler or pruner by its class name in optuna.samplers / optuna.pruners."""

    name: str
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Train:
    max_steps: int = 200  # optimizer steps per trial
    eval_every: int = 50  # validation loss every N steps (what the pruner sees)
    batch_size: int = 8  # examples per batch
    grad_accum: int = 1  # batches per optimizer step
    micro_batch: int = 0  # examples per forward pass (divides batch_size); 0 = the whole batch
    max_seq_len: int = 512  # longer examples are truncated
    train_examples: int = 0  # training examples used (0 = all)
    val_examples: int = 256  # held-out training examples for the validation loss
    val_accuracy: bool = False  # sst2: also the accuracy on them at every validation (curves)
    val_batch_size: int = 0  # examples per validation forward pass; 0 = as in training
    optimizer: str = "paged_adamw_8bit"  # or paged_adamw_32bit (any HF Trainer optim name)
    warmup_ratio: float = 0.05
    gradient_checkpointing: bool = True
    checkpoint_share: float = 1.0  # of the decoder layers recomputed (the rest keep activations)
    kernels: str = "auto"  # Liger's fused kernels where they run (CUDA + Triton), or "none"
    packing: bool = True  # padding-free batches of variable-length examples
    # logits only at the positions followed by a labelled (answer) token: in the validation
    # loss always, in training where the loss is not fused (src/speed.py)
    labelled_logits: bool = True
    # ... and under Liger's fused training loss in batches that score at most this share of
    # their positions (their logits alone, transformers' loss: no fused chunks over every
    # position, none of its waits for the card; SQuAD and SST-2 batches score ~3 %); 0: the
    # fused loss in every training batch (src/speed.LabelledLogits)
    unfused_share: float = 0.0625
    # torch's varlen flash attention on packed rows (CUDA, where its check passes; src/speed.py)
    packed_attention: bool = True
    compile: bool = False  # torch.compile each decoder layer (CUDA only)
    cuda_graphs: bool = True  # checkpointed layers replayed as CUDA graphs (src/cuda_graphs.py)
    fused_lora: bool = True  # each LoRA layer as one autograd node (src/fused_lora.py)
    # a recomputed layer's 4-bit weights dequantized once for its recomputation and backward
    # (held meanwhile: one layer's 16-bit weights) instead of twice, where the layers run
    # through the trial's own checkpoint (`cuda_graphs`, CUDA; src/fused_lora.py). On
    # the H200, 7B SQuAD: training 4-15 % faster (the less, the slower the host) for a 8-10 %
    # higher training peak (12.4 -> 13.6 GiB); 0.5B AlpacaEval: 9 % faster, +0.4 %
    # (docs/bench/README.md, sessions 20 and 21)
    dequantize_once: bool = True
    cudnn_attention: bool = False  # cuDNN's SDPA kernel: a plan per new shape (src/speed.py)
    # bitsandbytes' optimizer step waiting for the card after every parameter (and at the end
    # where states are paged), as the library does; off: no wait (src/speed.py)
    optimizer_waits: bool = False
    # bitsandbytes' optimizer step as one update kernel per parameter group (the LoRA tensors
    # as views of one flat tensor) where that gives the same numbers; off: one per tensor
    grouped_updates: bool = True
    # packed training batches padded up to a length already captured as CUDA graphs where the
    # trial measured that cheaper than capturing their own (src/shapes.py); off: each to its
    # bucket
    shape_plan: bool = True
    target_modules: str = "all-linear"  # PEFT: every linear layer except the output head
    compute_dtype: str = "auto"  # bfloat16 on CUDA, float32 on the CPU (bf16 matmul is slow there)
    system_prompt: str | None = None  # None keeps the chat template's default system prompt
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class Eval:
    max_examples: int = 0  # evaluation examples (0 = the whole evaluation set)
    batch_size: int = 32
    max_new_tokens: int = 32  # generated answer length bound (squad, alpacaeval)
    # alpacaeval: who compares the model's outputs with the reference outputs.
    # {name = "local"} the trial's base model (adapter off) or {name = "local", model = ALIAS};
    # {name = "openai", base_url = ..., model = ..., api_key_env = "OPENAI_API_KEY"};
    # {name = "package.module:function", ...} your own (see objectives/judges.py).
    judge: dict[str, Any] = dataclasses.field(default_factory=lambda: {"name": "local"})


@dataclasses.dataclass(frozen=True)
class Data:
    dir: Path | None = None  # local folder in the layout of shared/data; None = the model hub
    # alpacaeval's instruction-tuning set: a file inside `dir`, or a hub dataset id without it
    train_set: str | None = None


@dataclasses.dataclass(frozen=True)
class Model:
    alias: str
    id: str | None = None  # model hub id, e.g. Qwen/Qwen2.5-0.5B-Instruct
    path: Path | None = None  # local folder with config.json and weights
    package: str | None = None  # an installed Python package that ships a GGUF file
    gguf_file: str | None = None
    trust_remote_code: bool = False
    layers: int = 0  # keep only the first N transformer layers (a smaller model); 0 = all


@dataclasses.dataclass(frozen=True)
class Study:
    name: str
    task: str
    models: tuple[str, ...]
    space: Space
    n_trials: int
    sampler: Component
    pruner: Component
    train: Train
    eval: Eval
    data: Data
    trial_timeout_s: float = 0.0  # wall-clock limit of one trial (0 = none)
    # memory budget of one trial in GiB (the reference card: a 24 GB RTX 3090). A trial whose
    # peak exceeds it, or that runs out of memory under it, is infeasible. 0 = no budget.
    vram_budget_gb: float = 24.0
    heartbeat_s: int = 30  # the sweep's heartbeat per running trial (SQL storages)
    retries: int = 1  # re-runs of a trial orphaned by a dead sweep, with the same parameters
    # trials one worker process runs, keeping its imports and loaded base model between
    # trials of the same base (1: a fresh process per trial)
    worker_trials: int = 16


@dataclasses.dataclass(frozen=True)
class Storage:
    optuna: str
    mlflow: str
    artifacts: Path
    trials: Path
    cache: Path  # converted models and other caches the trials make
    reports: Path  # sweep report's default output: <reports>/<study>/


@dataclasses.dataclass(frozen=True)
class Config:
    path: Path
    storage: Storage
    models: dict[str, Model]
    studies: dict[str, Study]


DEFAULT_SAMPLER = {"name": "TPESampler"}
DEFAULT_PRUNER = {"name": "MedianPruner"}
DEFAULT_STORAGE = {
    "optuna": "sqlite:///storage/optuna.db",
    "mlflow": "sqlite:///storage/mlflow.db",
    "artifacts": "storage/mlartifacts",
    "trials": "storage/trials",
    "cache": "data",
    "reports": "storage/reports",
}
STUDY_KEYS = {
    "task",
    "models",
    "space",
    "n_trials",
    "sampler",
    "pruner",
    "train",
    "eval",
    "data",
    "trial_timeout_s",
    "vram_budget_gb",
    "heartbeat_s",
    "retries",
    "worker_trials",
}
# plain-valued study keys; their defaults are the Study dataclass's
STUDY_SCALARS = {"trial_timeout_s": "float", "vram_budget_gb": "float", "heartbeat_s": "int",
                 "retries": "int", "worker_trials": "int"}  # fmt: skip


def load(path: Path, overrides: list[str] = (), study: str | None = None) -> Config:
    """Read, merge and check `path`; `overrides` are `--set KEY=VALUE` for `study`."""
    path = Path(path).resolve()
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}", "--config")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:  # its message gives the line and column
        raise ConfigError(f"{path.name} is not valid TOML: {err}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path.name} is not UTF-8 text (byte {err.start})") from None
    _check_keys(raw, {"defaults", "models", "studies", "storage"}, "")
    for table in ("defaults", "models", "studies", "storage"):
        _check_type(raw.get(table, {}), dict, table)
    for name in raw.get("studies", {}):
        table = raw["studies"][name]
        _check_type(table, dict, f"studies.{name}")
        raw["studies"][name] = _merge(raw.get("defaults", {}), table)
    if study is not None:
        if study not in raw.get("studies", {}):
            raise unknown("study", study, raw.get("studies", {}), "--study")
        for item in overrides:
            _apply_override(raw["studies"][study], item, f"studies.{study}")
    root = path.parent
    models = {a: _model(a, t, root) for a, t in _table(raw, "models").items()}
    studies = {n: _study(n, t, models, root) for n, t in _table(raw, "studies").items()}
    return Config(path, _storage(raw.get("storage", {}), root), models, studies)


def _merge(base: dict, top: dict) -> dict:
    """Tables merge key by key, except a component table (sampler, pruner, judge) that names
    another class: its keyword arguments would not fit, so it replaces the default's table."""
    out = copy.deepcopy(base)
    for key, value in top.items():
        below = out.get(key)
        if isinstance(value, dict) and isinstance(below, dict) and _same_class(below, value):
            out[key] = _merge(below, value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _same_class(below: dict, top: dict) -> bool:
    return "name" not in top or top["name"] == below.get("name")


def _apply_override(table: dict, item: str, prefix: str) -> None:
    """`--set train.max_steps=20`: the value is TOML (`20`, `"x"`, `[4, 8]`), else a string."""
    if "=" not in item:
        raise ConfigError(f"expected KEY=VALUE, got {item!r}", "--set")
    key, text = item.split("=", 1)
    *parents, leaf = key.strip().split(".")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    node = table
    for i, part in enumerate(parents):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{'.'.join(parents[: i + 1])} is not a table", f"--set {key}")
    node[leaf] = value


def _table(raw: dict, key: str) -> dict:
    value = raw.get(key, {})
    _check_type(value, dict, key)
    return value


def _check_keys(table: dict, allowed: set[str], where: str) -> None:
    for key in table:
        if key not in allowed:
            full = f"{where}.{key}" if where else key
            raise ConfigError(f"unknown key{did_you_mean(key, allowed)}", full)


def _check_type(value: Any, kind: type | tuple, key: str) -> Any:
    ok = isinstance(value, kind) and not (isinstance(value, bool) and kind in (int, float))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not ok:
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ConfigError(f"expected {names}, got {type(value).__name__} {value!r}", key)
    return value


def _dataclass(cls: type, table: dict, key: str, **given: Any) -> Any:
    """Build `cls` from `table`, checking names and types against the dataclass fields."""
    _check_type(table, dict, key)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in given}
    _check_keys(table, set(fields), key)
    for name, field in fields.items():
        no_default = (
            field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        )
        if no_default and name not in table:
            raise ConfigError("missing", f"{key}.{name}")
    values = dict(given)
    for name, value in table.items():
        values[name] = _coerce(value, fields[name].type, f"{key}.{name}")
    return cls(**values)


def _coerce(value: Any, type_name: str, key: str) -> Any:
    simple = {"int": int, "float": float, "bool": bool, "str": str}
    if type_name in simple:
        return _check_type(value, simple[type_name], key)
    if type_name == "str | None":
        return _check_type(value, str, key)
    if type_name.startswith("tuple["):
        item = simple[type_name[6:].split(",")[0]]
        _check_type(value, list, key)
        return tuple(_check_type(v, item, f"{key}[{i}]") for i, v in enumerate(value))
    if type_name == "FloatRange":  # a table {low, high, log} or a plain number (fixed)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return FloatRange(float(value), float(value), fixed=True)
        return _dataclass(FloatRange, value, key, fixed=False)
    if type_name == "dict[str, Any]":
        return _check_type(value, dict, key)
    raise AssertionError(f"no coercion for {type_name}")  # a programming error, not user input


def _model(alias: str, table: dict, root: Path) -> Model:
    key = f"models.{alias}"
    _check_type(table, dict, key)
    path = table.get("path")
    if path is not None:
        table = {**table, "path": str(_check_type(path, str, f"{key}.path"))}
    model = _dataclass(Model, {k: v for k, v in table.items() if k != "path"}, key, alias=alias)
    sources = [s for s in ("id", "path", "package") if table.get(s) is not None]
    if len(sources) != 1:
        raise ConfigError("give exactly one of id, path, package", key)
    if path is not None:
        model = dataclasses.replace(model, path=_resolve(root, path))
    if model.package is not None and not model.gguf_file:
        raise ConfigError("a model from a package needs gguf_file", f"{key}.gguf_file")
    return model


def _study(name: str, table: dict, models: dict[str, Model], root: Path) -> Study:
    key = f"studies.{name}"
    _check_keys(table, STUDY_KEYS, key)
    for required in ("task", "models", "n_trials"):
        if required not in table:
            raise ConfigError("missing (set it in the study or in [defaults])", f"{key}.{required}")
    task = _check_type(table["task"], str, f"{key}.task")
    if task not in OBJECTIVES:
        raise unknown("task", task, OBJECTIVES, f"{key}.task")
    names = _check_type(table["models"], list, f"{key}.models")
    if not names:
        raise ConfigError("needs at least one model", f"{key}.models")
    for i, alias in enumerate(names):
        _check_type(alias, str, f"{key}.models[{i}]")
        if alias not in models:
            raise unknown("model alias", str(alias), models, f"{key}.models[{i}]")
    study = Study(
        name=name,
        task=task,
        models=tuple(names),
        space=_dataclass(Space, table.get("space", {}), f"{key}.space"),
        n_trials=_check_type(table["n_trials"], int, f"{key}.n_trials"),
        sampler=_component(table.get("sampler", DEFAULT_SAMPLER), f"{key}.sampler"),
        pruner=_component(table.get("pruner", DEFAULT_PRUNER), f"{key}.pruner"),
        train=_dataclass(Train, table.get("train", {}), f"{key}.train"),
        eval=_dataclass(Eval, table.get("eval", {}), f"{key}.eval"),
        data=_data(table.get("data", {}), root, f"{key}.data"),
        **{
            name: _coerce(table[name], kind, f"{key}.{name}")
            for name, kind in STUDY_SCALARS.items()
            if name in table
        },
    )
    _check_values(study, key)
    return study


def default_strategy(cfg: Config) -> tuple[Component, Component]:
    """[defaults]' sampler and pruner: what a study that names neither runs with."""
    raw = tomllib.loads(cfg.path.read_text(encoding="utf-8")).get("defaults", {})
    return (
        _component(raw.get("sampler", DEFAULT_SAMPLER), "defaults.sampler"),
        _component(raw.get("pruner", DEFAULT_PRUNER), "defaults.pruner"),
    )


def _component(table: dict, key: str) -> Component:
    _check_type(table, dict, key)
    if "name" not in table:
        raise ConfigError("missing name (an Optuna class name)", f"{key}.name")
    kwargs = {k: v for k, v in table.items() if k != "name"}
    return Component(_check_type(table["name"], str, f"{key}.name"), kwargs)


def _data(table: dict, root: Path, key: str) -> Data:
    _check_type(table, dict, key)
    _check_keys(table, {"dir", "train_set"}, key)
    train_set = table.get("train_set")
    if train_set is not None:
        _check_type(train_set, str, f"{key}.train_set")
    value = table.get("dir") or os.environ.get(DATA_DIR_ENV)
    if value is None:
        return Data(None, train_set)
    return Data(_resolve(root, _check_type(value, str, f"{key}.dir")), train_set)


def _resolve(root: Path, value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else (root / path).resolve()


def _check_values(study: Study, key: str) -> None:
    space, train = study.space, study.train
    for name in ("lr", "lr_full", "dropout"):
        rng: FloatRange = getattr(space, name)
        if rng.low >= rng.high and not rng.fixed:
            raise ConfigError(
                f"low must be < high (got {rng.low} and {rng.high}); "
                "a plain number fixes the value",
                f"{key}.space.{name}",
            )
    for name in ("lr", "lr_full"):
        if getattr(space, name).low <= 0:
            raise ConfigError("learning rates must be > 0", f"{key}.space.{name}.low")
    if space.dropout.low < 0 or space.dropout.high >= 1:
        raise ConfigError("dropout must lie in [0, 1)", f"{key}.space.dropout")
    for name in ("r", "alpha_multiple", "method"):
        values = getattr(space, name)
        if not values:
            raise ConfigError("needs at least one value", f"{key}.space.{name}")
        if name != "method" and any(v <= 0 for v in values):
            raise ConfigError("values must be > 0", f"{key}.space.{name}")
    positive = {
        "n_trials": study.n_trials,
        "train.max_steps": train.max_steps,
        "train.eval_every": train.eval_every,
        "train.batch_size": train.batch_size,
        "train.grad_accum": train.grad_accum,
        "train.max_seq_len": train.max_seq_len,
        "train.val_examples": train.val_examples,
        "eval.batch_size": study.eval.batch_size,
        "eval.max_new_tokens": study.eval.max_new_tokens,
        "heartbeat_s": study.heartbeat_s,
        "worker_trials": study.worker_trials,
    }
    for name, value in positive.items():
        if value <= 0:
            raise ConfigError(f"must be > 0 (got {value})", f"{key}.{name}")
    for name, value in {
        "train.train_examples": train.train_examples,
        "eval.max_examples": study.eval.max_examples,
        "trial_timeout_s": study.trial_timeout_s,
        "vram_budget_gb": study.vram_budget_gb,
        "retries": study.retries,
    }.items():
        if value < 0:
            raise ConfigError(f"must be >= 0 (got {value})", f"{key}.{name}")
    for i, method in enumerate(space.method):
        if method not in METHODS:
            raise unknown("method", method, METHODS, f"{key}.space.method[{i}]")
    _check_judge(study.eval.judge, f"{key}.eval.judge")
    if study.train.val_accuracy and not hasattr(OBJECTIVES[study.task], "accuracy"):
        raise ConfigError(
            f"the {study.task} task has no accuracy to validate (sst2 has)",
            f"{key}.train.val_accuracy",
        )
    if study.data.train_set is not None and study.task != "alpacaeval":
        raise ConfigError("only the alpacaeval task reads a train_set", f"{key}.data.train_set")
    if train.micro_batch < 0 or (train.micro_batch and train.batch_size % train.micro_batch):
        raise ConfigError(
            f"must divide train.batch_size ({train.batch_size}); 0 = the whole batch",
            f"{key}.train.micro_batch",
        )
    if train.val_batch_size < 0:
        raise ConfigError(
            "must be >= 0 (0 = the training micro-batch)", f"{key}.train.val_batch_size"
        )
    for name in ("checkpoint_share", "unfused_share"):
        if not 0 <= getattr(train, name) <= 1:
            raise ConfigError("must lie in [0, 1]", f"{key}.train.{name}")
    if train.compile and train.cuda_graphs:
        raise ConfigError(
            "compile and cuda_graphs exclude each other (both replace the decoder layers' call)",
            f"{key}.train.cuda_graphs",
        )
    if train.kernels not in KERNELS:
        raise unknown("kernels", train.kernels, KERNELS, f"{key}.train.kernels")
    if train.compute_dtype not in ("auto", "bfloat16", "float16", "float32"):
        raise unknown(
            "dtype",
            train.compute_dtype,
            ("auto", "bfloat16", "float16", "float32"),
            f"{key}.train.compute_dtype",
        )


METHODS = ("qlora", "lora", "full")
KERNELS = ("auto", "none")
JUDGES = ("local", "openai")  # or "package.module:function"


def _check_judge(judge: dict, key: str) -> None:
    name = judge.get("name")
    if not isinstance(name, str):
        raise ConfigError("missing name: local, openai or package.module:function", f"{key}.name")
    if name not in JUDGES and ":" not in name:
        raise unknown("judge", name, JUDGES, f"{key}.name")
    allowed = {"local": {"name", "model"}, "openai": {"name", "base_url", "model", "api_key_env"}}
    if name in allowed:
        _check_keys(judge, allowed[name], key)
    if name == "openai" and not judge.get("model"):
        raise ConfigError("the openai judge needs model (e.g. gpt-4-1106-preview)", f"{key}.model")


def _storage(table: dict, root: Path) -> Storage:
    _check_type(table, dict, "storage")
    _check_keys(table, set(DEFAULT_STORAGE), "storage")
    merged = {**DEFAULT_STORAGE, **table}
    for name, value in merged.items():
        _check_type(value, str, f"storage.{name}")
    return Storage(
        optuna=resolve_url(merged["optuna"], root),
        mlflow=resolve_url(merged["mlflow"], root),
        artifacts=_resolve(root, merged["artifacts"]),
        trials=_resolve(root, merged["trials"]),
        cache=_resolve(root, merged["cache"]),
        reports=_resolve(root, merged["reports"]),
    )


def resolve_url(url: str, root: Path) -> str:
    """Make a relative `sqlite:///rel/path.db` absolute against the config folder; a plain
    `postgresql://` names the psycopg (3) driver this project installs, unless psycopg2
    (SQLAlchemy's default for that scheme) is there."""
    if url.startswith("postgresql://") and importlib.util.find_spec("psycopg2") is None:
        return "postgresql+psycopg://" + url.removeprefix("postgresql://")
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith(prefix + "/"):
        return prefix + str(_resolve(root, url[len(prefix) :]))
    return url
