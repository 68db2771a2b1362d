"""The whole-trial benchmark's reading of trial results (sweep/whole_trial.py): where the
training time goes step by step, variants against plain. The trials themselves run on the
GPU (tests/gpu/whole_trial.sh); here their results are written by hand."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from sweep import config, trial_process, whole_trial
from sweep.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def _outcome(step_s: list[float], tokens: list[int], graphs: dict | None = None) -> dict:
    seen, rows = 0, []
    for i, (sec, n) in enumerate(zip(step_s, tokens, strict=True)):
        seen += n
        rows.append([i + 1, seen, 2.0, sec])
    return {
        "process_wall_s": 10 + sum(step_s),
        "start_s": 1.0,
        "phases": {"training": sum(step_s), "evaluation": 2.0},
        "generation": {"seconds": 1.5, "tokens": 300},
        "train_tokens": seen,
        "train_tokens_per_s": seen / sum(step_s),
        "total_params": 1000,
        "peak_memory_gib": 3.0,
        "eval_peak_memory_gib": 2.5,
        "device": "NVIDIA H200",
        "curve": {"train": rows, "val": []},
        "graphs": graphs or {},
        "profile": {},
    }


def test_new_shape_steps_are_told_apart_from_replays():
    """With graphs, a step whose padded size is new captured; its extra time is counted."""
    graphs = {"training": 56, "evaluation": 0, "capture_s": 2.0, "eager_calls": 0}
    outcome = _outcome([3.0, 0.5, 0.5, 2.0, 0.5, 0.5], [512, 512, 512, 640, 640, 512], graphs)
    st = whole_trial.steps(outcome)
    assert st["count"] == 6 and st["median_s"] == 0.5
    assert st["new_shape_steps"] == 2 and st["shapes"] == [512, 640]
    assert st["new_shape_s"] == 5.0 and st["new_shape_extra_s"] == 4.0
    assert st["trace"][3] == [640, 2.0] and len(st["trace"]) == 6
    # without graphs (plain) every step is just a step
    assert "new_shape_steps" not in whole_trial.steps(_outcome([1.0, 1.0], [500, 480]))
    # an old result without per-step seconds: nothing to say
    old = _outcome([1.0], [500])
    old["curve"]["train"] = [[1, 500, 2.0]]
    assert whole_trial.steps(old) == {}


def test_variants_are_compared_with_plain_and_shown(tmp_path):
    runs = {
        "plain": [_outcome([1.0] * 4, [400] * 4)],
        "trial": [
            _outcome(
                [0.5] * 4,
                [400] * 4,
                {
                    "training": 2,
                    "capture_s": 0.1,
                    "probes": [[True, 64, 1, 1, True]] * 2 + [[False, 512, 1, 3, False]],
                    "inferred": 5,
                },
            )
        ],
        "eager": [_outcome([0.4] * 4, [400] * 4)],
    }
    args = SimpleNamespace(study="squad", rounds=1, rank=16, cold=False)
    study_cfg = config.load(ROOT / "sweep.toml", study="squad").studies["squad"]
    result = whole_trial.summarize(runs, args, study_cfg, "7B")
    assert result["ratio"]["training"] == pytest.approx(2.0)
    # 14 s vs 12 s from process start; 13 vs 11 after the 1 s of imports each
    assert result["ratio"]["whole_trial"] == pytest.approx(14 / 12)
    assert result["ratio"]["whole_trial_after_start"] == pytest.approx(13 / 11)
    assert result["variants"]["eager"]["ratio"]["training"] == pytest.approx(2.5)
    text = whole_trial.markdown(result)
    assert "| eager | 1,000 | 2.50 |" in text and "| trial | 800 | 2.00 |" in text
    assert "later trials pay) (s) | 13.0 | 11.0 | 1.18 |" in text
    assert "kernel caches filled by a short trial first" in text
    assert "| 3 (2) / 5 |" in text  # probes, host-bound among them, decided without a probe
    assert result["host"].endswith(" cores") and result["host"] in text


def test_the_host_cpu_is_named_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: AMD EPYC 9654 96-Core Processor\n")
    assert whole_trial.host_cpu(info).startswith("AMD EPYC 9654 96-Core Processor x ")
    assert whole_trial.host_cpu(tmp_path / "missing").startswith("unknown CPU x ")


@pytest.mark.parametrize("cold", [False, True])
def test_a_short_trial_fills_the_kernel_caches_before_anything_is_measured(
    tmp_path, monkeypatch, cold
):
    """By default the first process is a short trial of the trial path (what compiles the
    kernels a sweep's later trials load from disk), then plain and trial alternate; `--cold`
    leaves it out."""
    calls = []

    def trial(cfg, study_cfg, params, folder, recipe, profile=False):
        calls.append((folder.name, recipe, study_cfg.train.max_steps, study_cfg.eval.max_examples))
        return _outcome([0.5] * 4, [400] * 4)

    monkeypatch.setattr(whole_trial, "one_trial", trial)
    monkeypatch.setattr(whole_trial, "checkpoint", lambda args, cfg: (tmp_path, "7B"))
    monkeypatch.setattr(whole_trial, "fill_bytecode_cache", lambda: None)
    monkeypatch.setattr(whole_trial, "write", lambda result, out: result)
    args = SimpleNamespace(
        study="squad", rounds=1, rank=16, dropout=0.05, cold=cold, set=[], variant=[],
        config=ROOT / "sweep.toml", profile=False, out=tmp_path,
    )  # fmt: skip
    result = whole_trial.run(args)
    measured = [("plain-0", "plain", 300, 2000), ("trial-0", "trial", 300, 2000)]
    short = [] if cold else [("kernel-caches", "trial", 4, 16)]
    assert calls == short + measured
    assert result["kernel_caches"] == ("cold" if cold else "filled by a short trial first")


@pytest.mark.parametrize("spec", ["plain:cuda_graphs=false", ":cuda_graphs=false", "trial"])
def test_a_variant_needs_its_own_name(spec):
    with pytest.raises(ConfigError):
        whole_trial.variant_sets([spec])
    assert whole_trial.variant_sets(["eager:cuda_graphs=false,packing=true"]) == {
        "eager": ["train.cuda_graphs=false", "train.packing=true"]
    }
    assert whole_trial.variant_sets(["rows16:eval.batch_size=16,train.seed=1"]) == {
        "rows16": ["eval.batch_size=16", "train.seed=1"]
    }


def test_the_byte_code_cache_is_filled_before_the_first_recipe(tmp_path, monkeypatch):
    """Where trial processes share a byte-code cache, the bench fills it first, so the first
    recipe measured does not pay compiling alone; where they do not, it starts no process."""
    prefix = tmp_path / "pycache"
    monkeypatch.setattr(trial_process, "bytecode_cache", lambda: {})
    whole_trial.fill_bytecode_cache("sweep.errors")
    assert not prefix.exists()
    cache = {"PYTHONDONTWRITEBYTECODE": "", "PYTHONPYCACHEPREFIX": str(prefix)}
    monkeypatch.setattr(trial_process, "bytecode_cache", lambda: cache)
    whole_trial.fill_bytecode_cache("sweep.errors")
    source = trial_process.PROJECT_ROOT / "sweep"
    assert list((prefix / str(source).lstrip("/")).glob("errors.*.pyc"))
