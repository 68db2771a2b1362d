"""`python -m sweep bench`: the trial path against the plain QLoRA recipe, side by side.

The measuring happens in child processes (src/bench.py: torch, one process per recipe and
round, alternating); this side builds their input from the config, and writes the result as
JSON and a Markdown table under docs/bench/. `--overhead` instead times one real trial of a
study from process start to exit, to see what a trial spends outside training.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sweep import config, trial, trial_process
from sweep.errors import ConfigError
from sweep.results import package_versions

SHAPES = ("0.5B", "1.5B", "3B", "7B", "14B")  # src/random_qwen.py builds these


def variants(
    cfg_path: Path, study: str, specs: list[str], fixed: dict, sets: list[str] = ()
) -> dict[str, dict]:
    """{name: trial [train] table}; a spec is `NAME` or `NAME:key=value,key=value`, checked
    like `--set train.key=value` (one clear line for a bad key or value)."""
    out = {}
    for spec in specs or ["trial"]:
        name, _, pairs = spec.partition(":")
        items = [*sets, *(f"train.{kv}" for kv in pairs.split(",") if kv)]
        items += [f"train.{k}={json.dumps(v)}" for k, v in fixed.items()]
        train = config.load(cfg_path, items, study=study).studies[study].train
        out[name or "trial"] = dataclasses.asdict(train)
    return out


def run(args) -> Path:
    """Measure; returns the Markdown file written."""
    for name in ("seq", "batch", "rank", "steps", "rounds"):
        if getattr(args, name) <= 0:
            raise ConfigError(f"must be > 0 (got {getattr(args, name)})", f"--{name}")
    if args.steps < 8:
        raise ConfigError("the median needs at least 8 measured steps", "--steps")
    cfg = config.load(args.config)
    if args.study not in cfg.studies:
        raise ConfigError(f"unknown study {args.study!r}", "--study")
    model_dir, shape = model_folder(args, cfg)
    fixed = {
        "batch_size": args.batch,
        "max_seq_len": args.seq,
        "grad_accum": 1,
        "max_steps": args.warmup + args.steps,
    }
    work = Path(tempfile.mkdtemp(prefix="sweep-bench-"))
    bench = {
        "date": datetime.date.today().isoformat(),
        "command": "python -m sweep bench " + " ".join(sys.argv[2:]),
        "shape": shape,
        "model_dir": str(model_dir),
        "tokenizer": str(args.tokenizer),
        "seq": args.seq,
        "batch": args.batch,
        "rank": args.rank,
        "dropout": args.dropout,
        "steps": args.steps,
        "warmup": args.warmup,
        "rounds": args.rounds,
        "profile": args.profile,
        "study": args.study,
        "variants": variants(args.config, args.study, args.variant, fixed, args.set),
        "work_dir": str(work),
    }
    try:
        result = measure(work / "bench.json", bench, args.rounds)
    finally:  # the children's Trainer folders and gradient checks
        shutil.rmtree(work, ignore_errors=True)
    return write(result, args.out, f"{shape}-{args.seq}x{args.batch}")


def measure(path: Path, bench: dict, rounds: int) -> dict:
    """The children: one to prepare (what the card is), then one per recipe and round."""
    path.write_text(json.dumps(bench, indent=2))
    _child(["-m", "src.bench", str(path), "prepare"])
    bench = json.loads(path.read_text())
    bench["recipes"] = recipes(bench["cuda"], bench["variants"])
    path.write_text(json.dumps(bench, indent=2))
    runs = []
    for round_ in range(rounds):
        for index, recipe in enumerate(bench["recipes"]):
            print(f"bench: {recipe['name']}, round {round_ + 1} of {rounds}", flush=True)
            _child(["-m", "src.bench", str(path), str(index), str(round_)])
            runs.append(json.loads((path.parent / f"run-{round_}-{index}.json").read_text()))
    return {**bench, "versions": package_versions(), "runs": runs}


PLAIN = {"plain": False, "plain+autocast": True}  # the plain recipes: Trainer's bf16 autocast


def recipes(cuda: bool, variants: dict[str, dict]) -> list[dict]:
    """What each round runs, in order, each in a process of its own: the plain recipes
    (autocast only where there is CUDA), then the trial-path variants."""
    plain = [
        {"name": name, "autocast": autocast, "train": None}
        for name, autocast in PLAIN.items()
        if cuda or not autocast
    ]
    # the trial's Trainer autocasts to bf16 when that is its compute dtype (src/train_qlora)
    trial = [
        {"name": n, "autocast": t["compute_dtype"] in ("auto", "bfloat16"), "train": t}
        for n, t in variants.items()
    ]
    return plain + trial


def model_folder(args, cfg) -> tuple[Path, str]:
    """(checkpoint folder, shape name): a Qwen2.5 shape built once under the cache, or a
    folder given as is."""
    if args.model in SHAPES:
        folder = cfg.storage.cache / "random" / f"qwen2.5-{args.model.lower()}"
        if not (folder / "config.json").is_file() and not _tokenizer_found(args.tokenizer):
            raise ConfigError(
                f"building the {args.model} checkpoint needs a tokenizer: a folder with "
                f"tokenizer.json or a model hub id; {args.tokenizer} is neither",
                "--tokenizer",
            )
        return folder, args.model
    folder = Path(args.model)
    if not (folder / "config.json").is_file():
        known = ", ".join(SHAPES)
        raise ConfigError(f"not a shape ({known}) nor a model folder: {args.model}", "--model")
    return folder.resolve(), folder.name


def _tokenizer_found(name: str) -> bool:
    """A local folder with tokenizer.json, or something shaped like a hub id (org/name)."""
    if Path(name).exists() or name.startswith((".", "/", "~")):
        return (Path(name).expanduser() / "tokenizer.json").is_file()
    return name.count("/") == 1


def _child(argv: list[str]) -> None:
    env = trial_process.child_env()
    done = subprocess.run([sys.executable, *argv], cwd=trial_process.PROJECT_ROOT, env=env)
    if done.returncode:
        raise SystemExit(f"error: the benchmark process failed (exit {done.returncode})")


def summary(result: dict) -> list[dict]:
    """One row per variant (medians over rounds) with its ratios to the plain recipe."""
    by_variant: dict[str, list[dict]] = {}
    for row in result["runs"]:
        by_variant.setdefault(row["variant"], []).append(row)
    rows = []
    for name, runs in by_variant.items():
        row = {"variant": name, "rounds": len(runs)}
        for key in (
            "tokens_per_s",
            "step_s_median",
            "peak_allocated_gib",
            "peak_reserved_gib",
            "recorded_peak_gib",
            "nvml_peak_gib",
            "mfu",
            "setup_s",
        ):
            values = [r[key] for r in runs if r.get(key) is not None]
            row[key] = statistics.median(values) if values else None
        rows.append(row)
    plain = rows[0]
    autocast = next((r for r in rows if r["variant"] == "plain+autocast"), None)
    for row in rows:
        row["speed_x"] = row["tokens_per_s"] / plain["tokens_per_s"]
        if autocast:
            row["speed_x_autocast"] = row["tokens_per_s"] / autocast["tokens_per_s"]
        for key in ("peak_allocated_gib", "nvml_peak_gib"):
            if row[key] and plain[key]:
                row[key.replace("_gib", "_x")] = row[key] / plain[key]
    return rows


def markdown(result: dict) -> str:
    head = (
        f"# Benchmark: Qwen2.5-{result['shape']} shape, QLoRA r{result['rank']}, "
        f"{result['seq']} tokens x {result['batch']}\n\n"
        f"{result['date']} · {result['device']} · bf16 matrix rate measured here: "
        f"{_num(result.get('matmul_tflops'), 0)} TFLOP/s · {result['n_params']:,} parameters · "
        f"{result['steps']} measured steps after {result['warmup']} · {result['rounds']} "
        f"round(s), alternating, each recipe in a process of its own\n\n"
        f"`{result['command']}`\n\n"
        "| variant | tokens/s | x plain | x plain+autocast | step s (median) | peak allocated GiB "
        "| x plain | reserved GiB | recorded GiB | NVML GiB | x plain | MFU |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = [
        f"| {r['variant']} | {r['tokens_per_s']:,.0f} | {r['speed_x']:.2f} | "
        f"{_num(r.get('speed_x_autocast'))} | "
        f"{r['step_s_median']:.3f} | {_num(r['peak_allocated_gib'])} | "
        f"{_num(r.get('peak_allocated_x'))} | {_num(r['peak_reserved_gib'])} | "
        f"{_num(r['recorded_peak_gib'])} | {_num(r['nvml_peak_gib'])} | "
        f"{_num(r.get('nvml_peak_x'))} | {_pct(r['mfu'])} |"
        for r in summary(result)
    ]
    checks = [
        "\n## Same batch, same LoRA weights: loss and LoRA gradients against plain\n",
        "As trained: each recipe in its own dtype and autocast (bf16 on a GPU). In fp32: both "
        "built again with fp32 compute on the same 4-bit weights, so rounding does not hide a "
        "wrong gradient. Against plain in fp32: what each recipe's rounding costs.\n",
        "| variant | against | loss plain | loss variant | rel. diff | LoRA grad rel. err "
        "| per tensor: max | median | tensors |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    sections = (
        ("as_trained", "plain, as trained"),
        ("fp32", "plain, both in fp32"),
        ("vs_fp32_plain", "plain in fp32"),
    )
    first = [r for r in result["runs"] if r["round"] == 0]
    for key, against in sections:
        for run in first:
            if c := run.get("checks", {}).get(key):
                checks.append(
                    f"| {run['variant']} | {against} | {c['loss_plain']:.5f} | "
                    f"{c['loss_trial']:.5f} | {c['loss_rel_diff']:.2e} | "
                    f"{c['grad_rel_err']:.2e} | {c['grad_rel_err_max']:.2e} | "
                    f"{c['grad_rel_err_median']:.2e} | {c['lora_tensors']} |"
                )
    settings = ["\n## Variants (the trial path's [train] table: the keys that speed it up)\n"]
    for name, train in result["variants"].items():
        keys = (
            "micro_batch",
            "gradient_checkpointing",
            "checkpoint_share",
            "kernels",
            "packing",
            "compile",
            "cuda_graphs",
            "fused_lora",
            "optimizer",
        )
        settings.append(f"- {name}: " + ", ".join(f"{k}={train[k]}" for k in keys))
    versions = ", ".join(f"{k} {v}" for k, v in result["versions"].items())
    body = "\n".join(lines) + "\n" + "\n".join(checks + settings + profiles(result))
    return head + body + f"\n\n{versions}\n"


def profiles(result: dict) -> list[str]:
    """Where one forward+backward's time goes, per recipe that was profiled."""
    rows = [(r["variant"], r["profile"]) for r in result["runs"] if r.get("profile")]
    return profile_table(rows, "one forward + backward of one micro-batch (torch.profiler)")


def profile_table(rows: list[tuple[str, dict]], title: str, label: str = "variant") -> list[str]:
    """A Markdown table of src/profiling.py summaries, one row per (name, summary); with a
    column of the profiled steps where the summaries have them."""
    if not rows:
        return []
    names = list(rows[0][1]["by_category_s"])
    steps = any(p.get("steps") for _, p in rows)
    out = [
        f"\n## Profile: {title}\n",
        f"| {label} | {'steps | ' if steps else ''}wall s | GPU busy s | GPU idle | kernels | "
        + " | ".join(names)
        + " |",
        "|---" * (5 + steps + len(names)) + "|",
    ]
    for name, p in rows:
        cells = " | ".join(f"{p['by_category_s'][n]:.3f}" for n in names)
        step_cell = f"{p.get('steps')} | " if steps else ""
        out.append(
            f"| {name} | {step_cell}{p['wall_s']:.3f} | {p['gpu_busy_s']:.3f} | "
            f"{_pct(p['gpu_idle_share'])} | {p['kernel_launches']:,} | {cells} |"
        )
    return out


def _num(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f} %"


def write(result: dict, folder: Path, stem: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    device = re.sub(r"[^A-Za-z0-9]+", "-", result["device"]).strip("-").lower()
    path = folder / f"{result['date']}-{device}-{stem}.md"
    path.with_suffix(".json").write_text(json.dumps(result, indent=2))
    path.write_text(markdown(result))
    print(path.read_text())
    return path


def _timed_trial(cfg, study_cfg, params: dict, folder: Path, args) -> dict:
    """One trial of the overhead bench, from handing it out to its process being ready for
    the next (a warm worker) or gone."""
    folder.mkdir(parents=True)
    spec = trial.write_spec(cfg, study_cfg, params, folder)
    seen: dict[str, float] = {}

    def arrived(event: dict) -> bool:
        seen.setdefault(event["event"], time.perf_counter())
        return False  # never stop it

    started = time.perf_counter()
    worker = trial_process.launch(spec, {}, args.trials)
    ended = trial_process.follow(worker, folder / "log.txt", arrived)
    done = time.perf_counter()
    trial_process.release(worker, ended, keep=True)
    total = time.perf_counter() - started
    result_path = folder / "result.json"
    if "done" not in seen or not result_path.is_file():
        raise SystemExit(f"error: the trial in {folder} did not finish\n"
                         + trial_process.stderr_tail(folder))  # fmt: skip
    at = {k: v - started for k, v in seen.items()}
    phases = {
        "process start and imports" + (" (done ahead: warm spare)" if args.warm else ""): at[
            "start"
        ],
        "model load (or the kept base)": at["model"] - at["start"],
        "data preparation": at["data"] - at["model"],
        "trainer set-up": at["train_begin"] - at["data"],
        "training (incl. validation losses)": at["train_end"] - at["train_begin"],
        "evaluation and saving": at["done"] - at["evaluating"],
        "exit, or freeing for the next trial": total - (done - started),
    }
    inside = phases["training (incl. validation losses)"] + phases["evaluation and saving"]
    return {
        "total_s": total,
        "outside_training_s": total - inside,
        "outside_share": (total - inside) / total,
        "phases": phases,
        "trial": json.loads(result_path.read_text()),
    }


def overhead(args) -> Path:
    """Real trials (the study's first model, fixed parameters) timed from outside: what each
    spends before its first training step, in training, evaluating, and after. `--trials N`
    runs N of them one after another through one worker process (`worker_trials`), as a sweep
    does: the first pays the imports (unless `--warm`) and the model load, the next ones
    take the loaded base."""
    cfg = config.load(args.config, [*args.set, f"train.max_steps={args.steps}"], study=args.study)
    study_cfg = cfg.studies[args.study]
    params = {
        "model": study_cfg.models[0],
        "method": "qlora",
        "r": args.rank,
        "lora_alpha": 2 * args.rank,
        "lr": 2e-4,
        "dropout": 0.05,
    }
    folder = Path(tempfile.mkdtemp(prefix="sweep-overhead-"))
    if args.warm:  # as in a sweep: the process was started during the previous trial
        trial_process.POOL.prepare({}, 1, args.trials)
        trial_process.POOL.ready({})
    runs = [_timed_trial(cfg, study_cfg, params, folder / str(i), args) for i in range(args.trials)]
    trial_process.POOL.close()
    result = {
        "date": datetime.date.today().isoformat(),
        "study": args.study,
        "params": params,
        "steps": args.steps,
        "trials": args.trials,
        "warm_start": args.warm,
        "median_outside_share": statistics.median(run["outside_share"] for run in runs),
        "runs": runs,
        # the first trial's figures, as single-trial runs reported them
        **{k: runs[0][k] for k in ("total_s", "outside_training_s", "outside_share", "phases")},
        "trial": runs[0]["trial"],
    }
    outcome = runs[0]["trial"]
    names = list(runs[0]["phases"])
    lines = [
        f"# Trial overhead: {args.study}, {args.steps} steps, {args.trials} trial(s) in one "
        f"worker, {outcome.get('device')}\n",
        f"{result['date']} · median outside training and evaluation "
        f"{100 * result['median_outside_share']:.1f} % · first trial: total "
        f"{runs[0]['total_s']:.1f} s, outside {runs[0]['outside_training_s']:.1f} s · recorded "
        f"peaks {', '.join(_num(r['trial'].get('peak_memory_gib')) for r in runs)} GiB "
        f"({outcome.get('memory_kind')})\n",
        "| phase | " + " | ".join(f"trial {i + 1}" for i in range(len(runs))) + " |",
        "|---|" + "---|" * len(runs),
    ]
    lines += [f"| {name} | " + " | ".join(f"{r['phases'][name]:.2f}" for r in runs) + " |"
              for name in names]  # fmt: skip
    shares_row = [f"{r['outside_training_s']:.2f} s, {100 * r['outside_share']:.1f} %"
                  for r in runs]  # fmt: skip
    lines += ["| **outside, share** | " + " | ".join(shares_row) + " |"]
    args.out.mkdir(parents=True, exist_ok=True)
    warm = "-warm" if args.warm else ""
    many = f"-{args.trials}trials" if args.trials > 1 else ""
    path = args.out / f"{result['date']}-overhead-{args.study}-{args.steps}steps{many}{warm}.md"
    path.with_suffix(".json").write_text(json.dumps(result, indent=2))
    path.write_text("\n".join(lines) + "\n")
    print(path.read_text())
    return path
