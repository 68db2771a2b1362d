"""Builders with flat parameters: find the weights, load them in 4-bit, add LoRA."""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from src import speed


def model_source(
    model_id: str | None,
    path: str | None,
    package: str | None,
    gguf_file: str | None,
    cache_dir: Path,
) -> str:
    """What `from_pretrained` should open: a hub id, a local folder, or a converted GGUF."""
    if package:
        return str(convert_gguf(package, gguf_file, cache_dir))
    return path or model_id


def convert_gguf(package: str, gguf_file: str, cache_dir: Path) -> Path:
    """Convert a GGUF file shipped in a Python package to safetensors, once (cached).

    transformers dequantizes GGUF to fp32 on load; saving that as safetensors makes later
    loads fast and lets bitsandbytes quantize it like any hub checkpoint.
    """
    target = cache_dir / "models" / f"{package}--{Path(gguf_file).stem}"
    if (target / "model.safetensors").exists():
        return target
    spec = importlib.util.find_spec(package)  # not imported: the package may need its own deps
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"python package {package!r} is not installed")
    folder = spec.submodule_search_locations[0]
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file)
    model.hf_quantizer.remove_quantization_config(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    model.save_pretrained(tmp)  # safetensors
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(target)  # atomic: two trials converting at once keep one copy
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def compute_dtype(name: str) -> torch.dtype:
    """`auto`: bf16 on CUDA; fp32 on the CPU, where bf16 matmuls run ~4x slower than fp32."""
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return getattr(torch, name)


def load_tokenizer(source: str, trust_remote_code: bool = False):
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_4bit_model(
    source: str, dtype: torch.dtype, trust_remote_code: bool = False, layers: int = 0
):
    """NF4 with double quantization (QLoRA), compute in `dtype`."""
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
    )
    device_map = {"": torch.cuda.current_device()} if torch.cuda.is_available() else {"": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(
        source,
        quantization_config=quant,
        dtype=dtype,
        device_map=device_map,
        trust_remote_code=trust_remote_code,
        use_safetensors=True,  # never unpickle weights
        **_first_layers(layers),
    )
    keep_cpu_4bit_gradients_exact(model)
    return model


def load_16bit_model(
    source: str, dtype: torch.dtype, trust_remote_code: bool = False, layers: int = 0
):
    """The base in the compute dtype, for 16-bit LoRA and full fine-tuning."""
    device_map = {"": torch.cuda.current_device()} if torch.cuda.is_available() else {"": "cpu"}
    return AutoModelForCausalLM.from_pretrained(
        source,
        dtype=dtype,
        device_map=device_map,
        trust_remote_code=trust_remote_code,
        use_safetensors=True,
        **_first_layers(layers),
    )


def _first_layers(layers: int) -> dict:
    """A config override: from_pretrained then builds and loads only the first N layers."""
    return {"num_hidden_layers": layers} if layers else {}


def folder_spec(folder: str) -> dict:
    """A [models] entry for a local model folder, as a trial's spec.json holds it (the keys
    of sweep.config.Model, which `load_base` reads)."""
    return {
        "alias": Path(folder).name,
        "id": None,
        "path": str(folder),
        "package": None,
        "gguf_file": None,
        "trust_remote_code": False,
        "layers": 0,
    }


def load_base(model_spec: dict, dtype_name: str, cache_dir: Path, method: str = "qlora"):
    """(model, tokenizer, source) for a model entry as the trial's spec.json holds it:
    4-bit for qlora, the compute dtype for lora and full."""
    source = model_source(model_spec["id"], model_spec["path"], model_spec["package"],
                          model_spec["gguf_file"], cache_dir)  # fmt: skip
    trust = model_spec["trust_remote_code"]
    tokenizer = load_tokenizer(source, trust_remote_code=trust)
    load = load_4bit_model if method == "qlora" else load_16bit_model
    model = load(source, compute_dtype(dtype_name), trust, model_spec.get("layers", 0))
    return model, tokenizer, source


def keep_cpu_4bit_gradients_exact(model) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for AVX512-BF16 CPUs.

    On such CPUs the first no-grad forward in eval mode repacks the weights, and every LoRA
    gradient after it is silently wrong. Returns the number of layers changed.
    """
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


def add_lora(
    model,
    r: int,
    alpha: float,
    dropout: float,
    target_modules: str | list[str],
    gradient_checkpointing: bool,
):
    """PEFT LoRA (all linear layers but the head by default) on a 4-bit or 16-bit base, with
    the base's other weights left in the compute dtype (src/speed.py; the plain recipe's
    fp32 upcast is in src/bench.py)."""
    speed.freeze_for_lora(model, gradient_checkpointing)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def plain_lora(source: str, r: int, alpha: float, dropout: float, dtype=None):
    """The plain QLoRA recipe as its tutorials write it, the baseline of the benchmarks: 4-bit
    base, `prepare_model_for_kbit_training` (fp32 upcast of the other weights, checkpointing
    on), PEFT LoRA on all linear layers."""
    model = load_4bit_model(source, dtype or compute_dtype("auto"))
    model = prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def load_trained(trial_dir: Path, spec: dict, base_method: str | None = None):
    """(model, tokenizer) a trial trained: its fully fine-tuned `model/`, or its base (loaded
    as `base_method`, default the trial's own method) with its `adapter/`."""
    from peft import PeftModel

    method, dtype = spec["params"].get("method", "qlora"), spec["train"]["compute_dtype"]
    if method == "full":
        folder = str(trial_dir / "model")
        return load_16bit_model(folder, compute_dtype(dtype)), load_tokenizer(folder)
    base, tokenizer, _ = load_base(
        spec["model"], dtype, Path(spec["cache_dir"]), base_method or method
    )
    return PeftModel.from_pretrained(base, trial_dir / "adapter", use_safetensors=True), tokenizer


def count_params(model) -> tuple[int, int]:
    """(trainable, total) parameters; 4-bit weights count as their logical element count."""
    if hasattr(model, "get_nb_trainable_parameters"):  # PEFT
        trainable, total = model.get_nb_trainable_parameters()
        return int(trainable), int(total)
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total


if __name__ == "__main__":  # python -m src.models PACKAGE GGUF_FILE CACHE_DIR (sweep prepare)
    import sys

    print(convert_gguf(sys.argv[1], sys.argv[2], Path(sys.argv[3])))
