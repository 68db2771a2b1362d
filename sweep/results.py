"""What one trial produces, as data: written by the trial process, read by the sweep.

Plain Python only (no torch), so both processes share it.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import platform
import subprocess
from importlib import metadata
from pathlib import Path

PACKAGES = (
    "liger_kernel",
    "triton",
    "torch",
    "transformers",
    "peft",
    "bitsandbytes",
    "accelerate",
    "optuna",
    "mlflow",
    "mlflow-skinny",
)


class Status(enum.StrEnum):
    SUCCESS = "success"
    PRUNED = "pruned"
    FAILED = "failed"
    INFEASIBLE = "infeasible"  # out of memory under the budget: a constraint, not a failure


@dataclasses.dataclass
class TrialResult:
    status: Status
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    peak_memory_gib: float | None = None  # training's peak: the memory objective
    eval_peak_memory_gib: float | None = None  # evaluation's, measured apart (same kind)
    memory_kind: str = ""  # "cuda_process" (as NVML counts), "cuda_reserved" or "cpu_rss"
    nvml_peak_gib: float | None = None
    trainable_params: int = 0
    total_params: int = 0
    train_tokens: int = 0
    train_tokens_per_s: float = 0.0
    train_seconds: float = 0.0
    wall_seconds: float = 0.0
    steps: int = 0
    last_val_loss: float | None = None
    phases: dict[str, float] = dataclasses.field(default_factory=dict)  # seconds per phase
    generation: dict = dataclasses.field(default_factory=dict)  # src/generation.py's stats
    # {"train": [[step, tokens, loss, seconds], ...], "val": [[step, val loss, val accuracy], ...]}
    curve: dict = dataclasses.field(default_factory=dict)
    # CUDA graphs (src/cuda_graphs.py): signatures captured, calls run eagerly instead
    graphs: dict = dataclasses.field(default_factory=dict)
    profile: dict = dataclasses.field(default_factory=dict)  # src/profiling.py, when asked
    device: str = ""
    error: str = ""
    versions: dict[str, str] = dataclasses.field(default_factory=dict)
    git: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def trainable_pct(self) -> float:
        return 100.0 * self.trainable_params / self.total_params if self.total_params else 0.0

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data["status"] = self.status.value
        data["trainable_pct"] = self.trainable_pct
        return json.dumps(data, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TrialResult:
        data = json.loads(text)
        data.pop("trainable_pct", None)
        data["status"] = Status(data["status"])
        return cls(**data)

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(self.to_json())
        tmp.replace(path)  # atomic: a reader never sees half a result

    @classmethod
    def load(cls, path: Path) -> TrialResult:
        return cls.from_json(path.read_text())


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def git_state(repo: Path) -> dict[str, str]:
    """Commit and dirty flag of the project checkout, so a result can be traced to its code."""

    try:
        commit = _git(repo, "rev-parse", "HEAD")
        dirty = bool(_git(repo, "status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.TimeoutExpired):
        return {}
    return {"commit": commit or "unknown", "dirty": str(dirty).lower()}


def _git(repo: Path, *args: str) -> str:
    out = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=10)
    return out.stdout.strip() if out.returncode == 0 else ""


def base_key(spec: dict) -> str | None:
    """What a trial's loaded base model depends on (its model entry, method, compute dtype,
    fused kernels, compiled layers), as one string: a warm worker that holds a base of the
    same key may run the trial on it (sweep/trial_process.py, src/train_qlora.Warm). None for
    what never shares a base: full fine-tuning (it trains every weight) and the plain recipe."""
    method = spec["params"].get("method", "qlora")
    if method == "full" or spec.get("recipe") == "plain":
        return None
    train = spec["train"]
    kept = [spec["model"], method, train["compute_dtype"], train["kernels"], train["compile"]]
    return json.dumps(kept, sort_keys=True)
