"""`python -m sweep bench --whole-trial --study NAME --model SHAPE`: one whole trial of a
study's real rows and settings, as the plain recipe would run it and as a trial runs it.

Each runs in a process of its own (`python -m src.train_qlora spec.json`, as in a sweep),
alternating for `--rounds`:

- plain: the plain QLoRA recipe with the Trainer's bf16 autocast (src/models.plain_lora,
  padded batches), then `model.generate` on the trained PEFT model as a user calls it (4-bit
  base + adapter, dynamic cache, the study's evaluation batch size);
- trial: the trial path (src/train_qlora.setup, src/generation's fast path).

Both train the same LoRA parameters on the same rows and answer the same questions with the
same cap on new tokens (random weights never stop early). Per phase (from the trial's own
clock, result.json's `phases`), training and generated tokens/s (generation after the first
batch, which pays one-off set-up in both), peaks of training and evaluation; written to
docs/bench/whole-trial-<study>-<shape>.json and .md. No torch here: the sweep side only.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sweep import config, trial, trial_process
from sweep.errors import ConfigError

RECIPES = ("plain", "trial")
# dense bf16 tensor rate per card (vendor figures) for MFU; other cards get none
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "RTX 3090": 71.0, "RTX 4090": 165.0}


def run(args) -> Path:
    """Measure; returns the Markdown file written."""
    if args.rounds <= 0:
        raise ConfigError(f"must be > 0 (got {args.rounds})", "--rounds")
    if args.study not in config.load(args.config).studies:
        raise ConfigError(f"unknown study {args.study!r}", "--study")
    # no memory cap: the plain recipe on a large shape needs more than the default 24 GiB
    # budget, and the comparison is of speed; both peaks are measured all the same
    sets = [*args.set, "vram_budget_gb=0"]
    cfg = config.load(args.config, sets, study=args.study)
    # the trial path as configured, and each --variant: the same with [train] overrides
    studies = {name: cfg.studies[args.study] for name in RECIPES}
    for name, items in variant_sets(args.variant).items():
        studies[name] = config.load(args.config, [*sets, *items], study=args.study).studies[
            args.study
        ]
    model_dir, shape = checkpoint(args, cfg)
    fill_bytecode_cache()
    model = config.Model(alias=f"random-{shape}", path=model_dir)
    cfg = dataclasses.replace(cfg, models={**cfg.models, model.alias: model})
    params = {
        "model": model.alias,
        "method": "qlora",
        "r": args.rank,
        "lora_alpha": 2 * args.rank,
        "lr": 2e-4,
        "dropout": args.dropout,
    }
    work = Path(tempfile.mkdtemp(prefix="sweep-whole-trial-"))
    runs: dict[str, list[dict]] = {name: [] for name in studies}
    try:
        if not args.cold:
            warm_kernel_caches(cfg, studies["trial"], params, work)
        for round_ in range(args.rounds):
            for name, study_cfg in studies.items():
                print(f"whole trial: {name}, round {round_ + 1} of {args.rounds}", flush=True)
                folder = work / f"{name}-{round_}"
                folder.mkdir()
                recipe = "plain" if name == "plain" else "trial"
                outcome = one_trial(cfg, study_cfg, params, folder, recipe, args.profile)
                runs[name].append(outcome)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = summarize(runs, args, studies["trial"], shape)
    return write(result, args.out)


def variant_sets(specs: list[str]) -> dict[str, list[str]]:
    """`NAME:key=value,eval.key=value` -> {NAME: ["train.key=value", "eval.key=value"]}: a
    bare key is [train]'s, `eval.` keys are [eval]'s (checked when loaded)."""
    out = {}
    for spec in specs:
        name, _, pairs = spec.partition(":")
        if not name or name in RECIPES:
            raise ConfigError(f"a variant needs a name other than {RECIPES}: {spec!r}", "--variant")
        out[name] = [
            kv if kv.startswith(("train.", "eval.")) else f"train.{kv}"
            for kv in pairs.split(",")
            if kv
        ]
    return out


def checkpoint(args, cfg) -> tuple[Path, str]:
    """(folder, shape): a random-weight Qwen2.5 shape built once under the cache (a child
    process: torch), or a model folder given as is."""
    from sweep.bench import SHAPES, model_folder

    folder, shape = model_folder(args, cfg)
    if shape in SHAPES and not (folder / "config.json").is_file():
        command = ["-m", "src.random_qwen", "--shape", shape, "--tokenizer", str(args.tokenizer)]
        done = subprocess.run(
            [sys.executable, *command, "--out", str(folder)],
            cwd=trial_process.PROJECT_ROOT,
            env=trial_process.child_env(),
        )
        if done.returncode:
            raise SystemExit(f"error: building the {shape} checkpoint failed")
    return folder, shape


def fill_bytecode_cache(module: str = "src.train_qlora") -> None:
    """Where the trial processes share a byte-code cache (`trial_process.bytecode_cache`), one
    child imports the trial's modules first: else the first recipe measured would pay
    compiling them (25 s against 8.5 s on the H200 host) and the other would not."""
    if trial_process.bytecode_cache():
        subprocess.run(
            [sys.executable, "-c", f"import {module}"],
            cwd=trial_process.PROJECT_ROOT,
            env=trial_process.child_env(),
            check=False,
        )


def warm_kernel_caches(cfg, study_cfg, params: dict, work: Path) -> None:
    """A short trial of the trial path (4 steps, 16 validation rows, 16 questions), not
    measured: the first trial process on a machine compiles the Triton kernels it uses
    (Liger's, torch's) into the on-disk caches every later trial loads them from. On the H200
    (7B SQuAD, docs/bench/README.md) that first process took 83.3 s against 69.8-70.5 s for
    the trial-path processes after it. What a sweep pays per trial is the latter; `--cold`
    measures the former."""
    short = dataclasses.replace(
        study_cfg,
        train=dataclasses.replace(study_cfg.train, max_steps=4, eval_every=2, val_examples=16),
        eval=dataclasses.replace(study_cfg.eval, max_examples=16),
    )
    print("whole trial: a short trial first, to fill the kernel caches", flush=True)
    folder = work / "kernel-caches"
    folder.mkdir()
    one_trial(cfg, short, params, folder, "trial")


def one_trial(
    cfg, study_cfg, params: dict, folder: Path, recipe: str, profile: bool = False
) -> dict:
    """One trial process from start to exit: its result.json, with the wall time seen from
    here and when each progress event arrived. `profile`: torch.profiler over 4 training
    steps from 3/5 of the way (src/profiling.py)."""
    spec_path = trial.write_spec(cfg, study_cfg, params, folder)
    spec = json.loads(spec_path.read_text())
    spec["recipe"] = recipe
    if profile:
        spec["profile_steps"] = [spec["train"]["max_steps"] * 3 // 5, 4]
    spec_path.write_text(json.dumps(spec, indent=2))
    seen: dict[str, float] = {}

    def arrived(event: dict) -> bool:
        seen.setdefault(event["event"], time.perf_counter())
        return False  # never stop it

    started = time.perf_counter()
    worker = trial_process.launch(spec_path, {})
    trial_process.release(worker, trial_process.follow(worker, folder / "log.txt", arrived), False)
    wall = time.perf_counter() - started
    result_path = folder / "result.json"
    if not result_path.is_file():
        log = folder / "stderr.log"
        tail = log.read_text()[-3000:] if log.is_file() else ""
        raise SystemExit(f"error: the {recipe} trial wrote no result\n{tail}")
    outcome = json.loads(result_path.read_text())
    if outcome["status"] != "success":
        raise SystemExit(f"error: the {recipe} trial ended {outcome['status']}: {outcome['error']}")
    outcome["process_wall_s"] = wall
    outcome["start_s"] = seen.get("start", started) - started  # process start and imports
    return outcome


def measures(outcome: dict) -> dict:
    """What the comparison reads from one trial's result."""
    gen = outcome.get("generation") or {}
    phases = dict(outcome.get("phases") or {})
    phases["process_start"] = outcome["start_s"]
    evaluation = phases.get("evaluation", 0.0)
    phases["scoring_and_judging"] = max(0.0, evaluation - gen.get("seconds", 0.0))
    tokens_per_s = outcome["train_tokens_per_s"]
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in outcome.get("device", "")), None)
    params = outcome.get("total_params") or 0
    return {
        "wall_s": outcome["process_wall_s"],
        # what a sweep's later trials pay: they are handed to a process started (imports done)
        # while the previous trial ran (sweep/trial_process.py), or to a warm worker
        "after_start_s": outcome["process_wall_s"] - outcome["start_s"],
        "phases_s": phases,
        "train_tokens": outcome["train_tokens"],
        "train_tokens_per_s": tokens_per_s,
        "mfu": 6 * params * tokens_per_s / (peak * 1e12) if peak else None,
        "generated_tokens": gen.get("tokens"),
        "generated_tokens_per_s": _rate(gen.get("tokens"), gen.get("seconds")),
        "generated_tokens_per_s_after_first_batch": _rate(
            gen.get("after_first_tokens"), gen.get("after_first_s")
        ),
        "generation": gen,
        "peak_gib": {"train": outcome["peak_memory_gib"], "eval": outcome["eval_peak_memory_gib"]},
        "nvml_peak_gib": outcome.get("nvml_peak_gib"),
        "memory_kind": outcome.get("memory_kind"),
        "metrics": outcome.get("metrics"),
        "last_val_loss": outcome.get("last_val_loss"),
        "device": outcome.get("device"),
        "steps": steps(outcome),
        "graphs": outcome.get("graphs") or {},
        "profile": outcome.get("profile") or {},
    }


def steps(outcome: dict) -> dict:
    """Where the training time goes step by step (the curve's per-step seconds): the median
    step, and with CUDA graphs the steps whose batch shape was new (their tokens, padding
    included, first seen), which captured graphs, against the steps that replayed them."""
    rows = [row for row in (outcome.get("curve") or {}).get("train", []) if len(row) > 3]
    if not rows:
        return {}
    seconds = [row[3] for row in rows]
    median = statistics.median(seconds)
    out = {"count": len(rows), "median_s": median, "total_s": sum(seconds)}
    if outcome.get("graphs"):
        tokens = [b[1] - a[1] for a, b in zip([[0, 0]] + rows[:-1], rows, strict=True)]
        new = {}
        for size, sec in zip(tokens, seconds, strict=True):
            new.setdefault(size, sec)
        out["new_shape_steps"] = len(new)
        out["new_shape_s"] = sum(new.values())
        out["new_shape_extra_s"] = sum(sec - median for sec in new.values())
        out["shapes"] = sorted(new)
        # every step's (tokens, seconds): where captures, probes and padding cost (per run)
        out["trace"] = [[size, sec] for size, sec in zip(tokens, seconds, strict=True)]
    return out


def _rate(tokens, seconds) -> float | None:
    return tokens / seconds if tokens and seconds else None


def _median(rows: list[dict], *path: str):
    values = []
    for row in rows:
        value = row
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        if value is not None:
            values.append(value)
    return statistics.median(values) if values else None


def summarize(runs: dict[str, list[dict]], args, study_cfg, shape: str) -> dict:
    per = {name: [measures(o) for o in outcomes] for name, outcomes in runs.items()}
    plain, fast = per["plain"], per["trial"]

    def ratio(*path, inverse=False, of=fast):
        a, b = _median(plain, *path), _median(of, *path)
        if not a or not b:
            return None
        return a / b if inverse else b / a

    variants = {
        name: {
            "median": _medians(rows),
            "runs": rows,
            "ratio": {
                "whole_trial": ratio("wall_s", inverse=True, of=rows),
                "training": ratio("train_tokens_per_s", of=rows),
            },
        }
        for name, rows in per.items()
        if name not in RECIPES
    }

    gen_key = "generated_tokens_per_s_after_first_batch"
    return {
        "study": args.study,
        "shape": shape,
        "date": datetime.date.today().isoformat(),
        "command": "python -m sweep bench " + " ".join(sys.argv[2:]),
        "device": fast[0]["device"],
        "host": host_cpu(),
        "rounds": args.rounds,
        "kernel_caches": "cold" if args.cold else "filled by a short trial first",
        "settings": {
            "task": study_cfg.task,
            "train": trial.jsonable(dataclasses.asdict(study_cfg.train)),
            "eval": trial.jsonable(dataclasses.asdict(study_cfg.eval)),
            "rank": args.rank,
        },
        "plain": {"median": _medians(plain), "runs": plain},
        "trial": {"median": _medians(fast), "runs": fast},
        "ratio": {
            "whole_trial": ratio("wall_s", inverse=True),
            "whole_trial_after_start": ratio("after_start_s", inverse=True),
            "training": ratio("train_tokens_per_s"),
            "generation": ratio(gen_key),
            "generation_all_batches": ratio("generated_tokens_per_s"),
            "evaluation_phase": ratio("phases_s", "evaluation", inverse=True),
        },
        "variants": variants,
        "peak_gib": {
            "train": _median(fast, "peak_gib", "train"),
            "eval": _median(fast, "peak_gib", "eval"),
        },
        "eval_within_train_peak": all(
            r["peak_gib"]["eval"] <= r["peak_gib"]["train"] for r in fast if r["peak_gib"]["eval"]
        ),
    }


def host_cpu(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The host's CPU model and core count: the plain recipe waits for the card ~400 times a
    step, so its speed, and every ratio against it, moves with the host's (7B SQuAD plain:
    2,741-3,510 training tokens/s across the H200 machines of sessions 22 and 23,
    docs/bench/README.md)."""
    try:
        lines = cpuinfo.read_text().splitlines()
    except OSError:
        lines = []
    model = next(
        (line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), None
    )
    return f"{model or 'unknown CPU'} x {os.cpu_count()} cores"


def _medians(rows: list[dict]) -> dict:
    keys = ("wall_s", "after_start_s", "train_tokens_per_s", "mfu", "generated_tokens_per_s")
    out = {k: _median(rows, k) for k in keys}
    out["generated_tokens_per_s_after_first_batch"] = _median(
        rows, "generated_tokens_per_s_after_first_batch"
    )
    out["phases_s"] = {k: _median(rows, "phases_s", k) for k in rows[0]["phases_s"]}
    out["peak_gib"] = {k: _median(rows, "peak_gib", k) for k in ("train", "eval")}
    out["steps"] = {
        k: _median(rows, "steps", k) for k in rows[0]["steps"] if k not in ("shapes", "trace")
    }
    return out


def markdown(result: dict) -> str:
    plain, fast, ratio = result["plain"]["median"], result["trial"]["median"], result["ratio"]
    lines = [
        f"# Whole trial: {result['study']} on the Qwen2.5-{result['shape']} shape\n",
        f"{result['date']} · {result['device']} · {result.get('host', 'host not recorded')} · "
        f"{result['rounds']} round(s), each trial a "
        f"process of its own, alternating; kernel caches "
        f"{result.get('kernel_caches', 'cold')} · `{result['command']}`\n",
        "| | plain | trial | x |",
        "|---|---|---|---|",
        f"| whole trial, process start to exit (s) | {_num(plain['wall_s'], 1)} | "
        f"{_num(fast['wall_s'], 1)} | {_num(ratio['whole_trial'])} |",
        f"| whole trial after the process's imports (what a sweep's later trials pay) (s) | "
        f"{_num(plain.get('after_start_s'), 1)} | {_num(fast.get('after_start_s'), 1)} | "
        f"{_num(ratio.get('whole_trial_after_start'))} |",
        f"| training tokens/s (real batches) | {_num(plain['train_tokens_per_s'], 0)} | "
        f"{_num(fast['train_tokens_per_s'], 0)} | {_num(ratio['training'])} |",
        f"| MFU | {_pct(plain['mfu'])} | {_pct(fast['mfu'])} | |",
        f"| generated tokens/s after the first batch | "
        f"{_num(plain['generated_tokens_per_s_after_first_batch'], 0)} | "
        f"{_num(fast['generated_tokens_per_s_after_first_batch'], 0)} | "
        f"{_num(ratio['generation'])} |",
        f"| generated tokens/s, all batches | {_num(plain['generated_tokens_per_s'], 0)} | "
        f"{_num(fast['generated_tokens_per_s'], 0)} | {_num(ratio['generation_all_batches'])} |",
        f"| peak GiB, training (the objective) | {_num(plain['peak_gib']['train'])} | "
        f"{_num(fast['peak_gib']['train'])} | |",
        f"| peak GiB, evaluation | {_num(plain['peak_gib']['eval'])} | "
        f"{_num(fast['peak_gib']['eval'])} | |",
        "",
        "| phase (s) | plain | trial |",
        "|---|---|---|",
    ]
    for name in fast["phases_s"]:
        lines.append(
            f"| {name} | {_num(plain['phases_s'].get(name), 1)} | "
            f"{_num(fast['phases_s'][name], 1)} |"
        )
    return "\n".join(lines + step_lines(result) + profile_lines(result)) + "\n"


def _each(result: dict) -> list[tuple[str, dict]]:
    """(name, medians) of plain, the trial path and every variant."""
    rows = [("plain", result["plain"]["median"]), ("trial", result["trial"]["median"])]
    return rows + [(n, v["median"]) for n, v in result.get("variants", {}).items()]


def step_lines(result: dict) -> list[str]:
    """Training step by step, and the variants against plain."""
    lines = [
        "\n## Training steps\n",
        "| recipe | tokens/s | x plain | whole trial s | steps | median step s | "
        "new-shape steps | their s | their extra s | graphs captured (train / eval) | "
        "capture s | eager calls | probes (host-bound) / decided unprobed | "
        "batches padded past their bucket (src/shapes.py) |",
        "|---" * 14 + "|",
    ]
    base = result["plain"]["median"]["train_tokens_per_s"]
    for name, m in _each(result):
        st, runs = m.get("steps") or {}, (result.get("variants", {}).get(name) or result[name])
        g = runs["runs"][0].get("graphs") or {}
        lines.append(
            f"| {name} | {_num(m['train_tokens_per_s'], 0)} | "
            f"{_num(m['train_tokens_per_s'] / base if base else None)} | {_num(m['wall_s'], 1)} | "
            f"{_num(st.get('count'), 0)} | {_num(st.get('median_s'), 3)} | "
            f"{_num(st.get('new_shape_steps'), 0)} | {_num(st.get('new_shape_s'), 1)} | "
            f"{_num(st.get('new_shape_extra_s'), 1)} | "
            f"{g.get('training', '-')} / {g.get('evaluation', '-')} | "
            f"{_num(g.get('capture_s'), 1)} | {g.get('eager_calls', '-')} | {_probes(g)} | "
            f"{(g.get('plan') or {}).get('padded_beyond_bucket', '-')} |"
        )
    return lines


def _probes(graphs: dict) -> str:
    """The graphs' probes, how many found the card waiting for the host, and how many
    signatures they decided without a probe (src/cuda_graphs.judged)."""
    probes = graphs.get("probes")
    if probes is None:
        return "-"
    host = sum(bool(p[-1]) for p in probes)
    return f"{len(probes)} ({host}) / {graphs.get('inferred', '-')}"


def profile_lines(result: dict) -> list[str]:
    """torch.profiler over a few training steps (first round), per recipe that has one."""
    found = []
    for name, _ in _each(result):
        runs = (result.get("variants", {}).get(name) or result[name])["runs"]
        if runs and runs[0].get("profile"):
            found.append((name, runs[0]["profile"]))
    from sweep.bench import profile_table

    lines = profile_table(found, "training steps (torch.profiler, first round)", "recipe")
    for name, p in found:
        lines.append(
            f"\n{name}, busiest kernels: "
            + "; ".join(
                f"{k['name'][:60]} {k['s']:.3f} s ({k['count']})" for k in p["top_kernels"][:6]
            )
        )
        lines.append(
            f"\n{name}, busiest host operators: "
            + "; ".join(
                f"{k['name'][:50]} {k['s']:.3f} s ({k['count']})"
                for k in p.get("top_host_ops", [])[:6]
            )
        )
    for name, p in found:
        if p.get("sync_sites"):
            lines.append(
                f"\n{name}, where the host waited for the GPU in the step after: "
                + "; ".join(f"{site} ({n})" for site, n in p["sync_sites"].items())
            )
    return lines


def _num(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f} %"


def write(result: dict, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"whole-trial-{result['study']}-{result['shape']}.md"
    path.with_suffix(".json").write_text(json.dumps(result, indent=2))
    path.write_text(markdown(result))
    print(path.read_text())
    return path
