"""`python -m sweep replay`: a study's sampler and pruner run against a learning-curve table
(`sweep curves`) instead of training: what a search strategy would have found, and at what
cost, over many seeds, in seconds on a CPU.

    python -m sweep replay --table docs/curves/sst2-smollm2.json.xz [--study NAME]
        [--seeds 20] [--budget 30] [--json] [--plot FILE.png] [--live STORAGE]

Each replayed trial asks the sampler for a configuration (sweep/space.py, as a real trial),
snaps it to the nearest recorded one (rank, alpha multiple and learning rate on log scales,
dropout on its range), then walks that run's validation losses through the pruner exactly as
the sweep does (a mirror trial in a single-objective companion study). A pruned trial costs
its start, its training tokens and validations up to the step it stopped at; a finished one
also its finish (save, evaluate); seconds come from the table's cost model (trials alone on
the card). Each seed runs until its spent cost reaches `--budget` full trials.

Strategies: the study's own (default: the table's space with [defaults]' sampler and pruner,
marked `default`), random search without pruning, and the alternatives in `alternatives`.

`--seed-noise`: a finished trial's metric as a real sweep sees it, its configuration's recorded
value plus seed noise drawn (per replay seed) from a normal distribution with the table's noise
floor (the sd over train seeds of the configurations it has several seeds of). The sampler and
the anytime curves see that value; "within 0.5 points" and the final gap count the recorded
value of the configuration the strategy would hand over (its best seen). The validation
losses the pruner sees get seed noise too (per step, the sd over train seeds at that step):
without it a replayed trial that snaps to a configuration already run repeats its curve
exactly and is pruned less than a live trial (docs/pruning.md). A table holds one
seed per configuration, so without it no replayed best can pass the table's best, while a live
study's best carries its trials' seed noise (docs/pruning.md: the live run ended 0.9 points
above the one-seed band).

`--parallel N`: N trials in flight at once, as a packed sweep runs them (the sampler asks
before the neighbours' results are in; the pruner compares with the trials finished so far).

`--live STORAGE`: a real study of the table's study name (run with the replayed strategy) in
that storage, costed the same way from what its trials recorded (training tokens, validations,
finished or pruned), in trial-number order: its best-so-far when it had spent the budget
(or all it spent, if less), against the default strategy's interquartile band there. Packed
trials share a card, so their wall time is not what one costs; the cost model is (as it is for
the table).
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import json
import math
import random
import statistics
import warnings
from pathlib import Path

import optuna
from optuna.trial import TrialState

from sweep import checks, rows, space
from sweep.config import Component, Config, Study, default_strategy
from sweep.errors import ConfigError

WITHIN = 0.5  # points: "found" means within this of the table's best configuration
GRID = 31  # anytime curve: cost points from 0 to the budget


@dataclasses.dataclass(frozen=True)
class Strategy:
    name: str
    sampler: Component
    pruner: Component
    default: bool = False


def alternatives(sampler: Component, eval_every: int, max_steps: int) -> list[Strategy]:
    """The pruners measured against the default (docs/pruning.md), all on the default sampler;
    resources are training steps, validations every `eval_every`."""
    first = eval_every
    rungs = dict(min_resource=first, reduction_factor=3)
    return [
        Strategy("random-no-pruning", Component("RandomSampler"), Component("NopPruner")),
        Strategy("tpe-no-pruning", sampler, Component("NopPruner")),
        Strategy("tpe-median", sampler, Component("MedianPruner", {"n_startup_trials": 4})),
        Strategy(
            "tpe-median-warmup-1/3",
            sampler,
            Component("MedianPruner", {"n_startup_trials": 4, "n_warmup_steps": max_steps // 3}),
        ),
        Strategy(
            "tpe-percentile-25-warmup-1/3",
            sampler,
            Component(
                "PercentilePruner",
                {"percentile": 25.0, "n_startup_trials": 4, "n_warmup_steps": max_steps // 3},
            ),
        ),
        Strategy("tpe-successive-halving", sampler, Component("SuccessiveHalvingPruner", rungs)),
        Strategy(
            "tpe-hyperband",
            sampler,
            Component(
                "HyperbandPruner",
                {"min_resource": first, "max_resource": max_steps, "reduction_factor": 3},
            ),
        ),
        Strategy(
            "tpe-patient-median",
            sampler,
            Component("PatientPruner", {"wrapped_pruner": {"name": "MedianPruner"}, "patience": 3}),
        ),
    ]


class Table:
    """The runs of a learning-curve table and the cost of stopping one at a step."""

    def __init__(self, data: dict):
        self.data = data
        self.runs = [r for r in data["runs"] if r.get("storage", 0) == 0]
        if not self.runs:
            raise ConfigError("the table has no runs", "--table")
        finals = [r["final"] for r in data["runs"]]
        self.points = 100.0 if max(finals) <= 1.0 else 1.0  # accuracy in [0, 1] -> points
        self.best = max(r["final"] for r in self.runs)
        cost = data["cost"]
        self.rate, self.val_s = cost["tokens_per_s"], cost["validation_s"]
        self.start_s, self.finish_s = cost["start_s"], cost["finish_s"]
        sp = data["space"]
        self.scales = {
            "r": (math.log2(min(sp["r"])), math.log2(max(sp["r"])), True),
            "alpha_multiple": (
                math.log2(min(sp["alpha_multiple"])),
                math.log2(max(sp["alpha_multiple"])),
                True,
            ),
            "lr": (math.log(sp["lr"]["low"]), math.log(sp["lr"]["high"]), True),
            "dropout": (sp["dropout"]["low"], sp["dropout"]["high"], False),
        }
        self._coords = [self._coord(r["params"]) for r in self.runs]

    def _coord(self, params: dict) -> list[float]:
        out = []
        for name, (low, high, log) in self.scales.items():
            if name not in params or high == low:
                continue
            value = params[name]
            if log:
                value = math.log2(value) if name != "lr" else math.log(value)
            out.append((value - low) / (high - low))
        return out

    def snap(self, params: dict) -> dict:
        """The recorded run nearest to `params` (normalised coordinates)."""
        params = params | ({"alpha_multiple": params["lora_alpha"] / params["r"]}
                           if "lora_alpha" in params else {})  # fmt: skip
        here = self._coord(params)
        k = min(
            range(len(self.runs)),
            key=lambda i: sum((a - b) ** 2 for a, b in zip(here, self._coords[i], strict=True)),
        )
        return self.runs[k]

    def cost(self, run: dict, stopped_at: int | None) -> tuple[float, int]:
        """(seconds, training tokens) of `run` stopped after step `stopped_at` (None: it
        finished: all its steps, validations and the final evaluation)."""
        steps = len(run["tokens"]) if stopped_at is None else stopped_at
        tokens = run["tokens"][steps - 1] if steps else 0
        vals = sum(1 for v in run["val"] if v[0] <= steps)
        return self.seconds(tokens, vals, finished=stopped_at is None), tokens

    def seconds(self, tokens: int, validations: int, finished: bool) -> float:
        """The cost model: start, training tokens, validations, and the finish (save,
        evaluate) of a trial that was not pruned."""
        spent = self.start_s + tokens / self.rate + validations * self.val_s
        return spent + (self.finish_s if finished else 0.0)

    @property
    def full_trial_s(self) -> float:
        return statistics.mean(self.cost(r, None)[0] for r in self.runs)

    def share_within(self, points: float) -> float:
        """Share of the table's configurations within `points` of its best: how easy the
        target is for random search."""
        near = [r for r in self.runs if abs(self.best - r["final"]) * self.points <= points + 1e-9]
        return len(near) / len(self.runs)

    def seed_groups(self) -> list[list[dict]]:
        """The runs of each configuration recorded with several train seeds."""
        by_config: dict[str, list[dict]] = {}
        for r in self.data["runs"]:
            by_config.setdefault(json.dumps(r["params"], sort_keys=True), []).append(r)
        return [g for g in by_config.values() if len(g) > 1]

    def loss_noise(self) -> dict[int, float] | None:
        """Seed noise of the validation loss: per validation step, the sd over train seeds of
        the same configuration (pooled over the configurations with several seeds)."""
        variances: dict[int, list[float]] = {}
        for group in self.seed_groups():
            curves_ = [{v[0]: v[1] for v in r["val"]} for r in group]
            for step in set.intersection(*(set(c) for c in curves_)):
                variances.setdefault(step, []).append(
                    statistics.variance([c[step] for c in curves_])
                )
        if not variances:
            return None
        return {step: math.sqrt(statistics.mean(v)) for step, v in sorted(variances.items())}

    def noise_floor(self) -> dict | None:
        """Spread of the final metric over train seeds of the same configuration (points)."""
        groups = [[r["final"] for r in group] for group in self.seed_groups()]
        if not groups:
            return None
        pooled = statistics.mean(statistics.variance(v) for v in groups)
        return {
            "configurations": len(groups),
            "seeds_each": statistics.median(len(v) for v in groups),
            "sd_points": self.points * math.sqrt(pooled),
            "mean_range_points": self.points * statistics.mean(max(v) - min(v) for v in groups),
        }


def replay_one(table: Table, study_cfg: Study, strategy: Strategy, seed: int, budget_s: float,
               direction: str, noise_sd: float = 0.0, parallel: int = 1,
               loss_sd: dict | None = None) -> dict:  # fmt: skip
    """One seed of one strategy: the trials it ran, its anytime curve [(seconds, recorded
    value of the best seen)] and what it saw [(seconds, best seen)]; `noise_sd` (metric units)
    adds seed noise to what it sees, `loss_sd` ({step: sd}) to the validation losses the
    pruner sees (independent draws per validation: the table's seed deviations at steps 10,
    20 and 30 are nearly uncorrelated). `parallel`: trials in flight at once, as a packed sweep
    runs them: each of that many lanes runs one trial after another on the cost model's
    clock, validations and ends are told in the order of that clock, and a new trial is asked
    when a lane frees (1: one trial after another)."""
    sampler_spec = strategy.sampler
    if "seed" in sampler_spec.kwargs or sampler_spec.name in ("RandomSampler", "TPESampler"):
        sampler_spec = dataclasses.replace(
            sampler_spec, kwargs=sampler_spec.kwargs | {"seed": seed}
        )
    sampler = checks.make_sampler(sampler_spec, study=study_cfg)
    study = optuna.create_study(directions=[direction, "minimize"], sampler=sampler)
    # named as the sweep names it: HyperbandPruner puts trials in brackets by a hash of it
    companion = optuna.create_study(
        study_name=f"{study_cfg.name}--val-loss",
        direction="minimize",
        pruner=checks.make_pruner(strategy.pruner),
    )
    sign = 1 if direction == "maximize" else -1
    noise = random.Random(seed)  # the same draws for every strategy of this seed
    loss_noise = random.Random(seed + 1_000_003)  # apart: the metric's draws stay as they were
    spent, used, unpruned, best, seen_best = 0.0, 0, 0, None, None
    curve, seen = [(0.0, None)], [(0.0, None)]
    events: list = []  # (clock seconds, order, trial in flight): its next validation or end
    order = itertools.count()

    def schedule(flight: dict) -> None:
        run, k = flight["run"], flight["next"]
        stop = run["val"][k][0] if k < len(run["val"]) else None
        at = flight["began"] + table.cost(run, stop)[0]
        heapq.heappush(events, (at, next(order), flight))

    def begin(at: float) -> None:
        trial = study.ask()
        run = table.snap(space.suggest(trial, study_cfg))
        schedule({"trial": trial, "run": run, "mirror": companion.ask(), "began": at, "next": 0})

    for _ in range(max(1, parallel)):
        begin(0.0)
    while events:
        at, _, flight = heapq.heappop(events)
        trial, run, mirror, k = flight["trial"], flight["run"], flight["mirror"], flight["next"]
        stopped_at = None
        if k < len(run["val"]):
            step, loss, _ = run["val"][k]
            if loss_sd:
                loss += loss_noise.gauss(0.0, loss_sd.get(step, 0.0))
            flight["loss"] = loss
            mirror.report(loss, step)
            if not mirror.should_prune():
                flight["next"] = k + 1
                schedule(flight)
                continue
            stopped_at = step
        seconds, tokens = table.cost(run, stopped_at)
        spent, used, unpruned = spent + seconds, used + tokens, unpruned + run["tokens"][-1]
        if stopped_at is None:
            value = run["final"] + (noise.gauss(0.0, noise_sd) if noise_sd else 0.0)
            study.tell(trial, [value, run["peak_gib"]])
            companion.tell(mirror, flight.get("loss", 0.0))  # its last validation loss
            if seen_best is None or sign * value > sign * seen_best:
                seen_best, best = value, run["final"]
        else:
            study.tell(trial, state=TrialState.PRUNED)
            companion.tell(mirror, state=TrialState.PRUNED)
        curve.append((spent, best))
        seen.append((spent, seen_best))
        if spent >= budget_s:  # trials still in flight are cut at the budget, not counted
            break
        begin(at)  # the lane takes the next trial
    return {
        "trials": sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.trials),
        "pruned": sum(t.state == TrialState.PRUNED for t in study.trials),
        "spent_s": spent,
        "tokens_saved": 1 - used / unpruned if unpruned else 0.0,
        "final_gap_points": None if best is None else sign * (table.best - best) * table.points,
        "curve": curve,
        "seen": seen,
    }


def seconds_to_within(table: Table, curve: list, points: float, sign: int) -> float | None:
    """When an anytime curve first comes within `points` of the table's best (None: never)."""
    for spent, best in curve:
        if best is not None and sign * (table.best - best) * table.points <= points + 1e-9:
            return spent
    return None


def best_at(curve: list, seconds: float):
    """Best-so-far of an anytime curve at `seconds` (None before the first finished trial)."""
    value = None
    for spent, best in curve:
        if spent > seconds:
            break
        value = best
    return value


def summarize(table: Table, strategy: Strategy, seeds: list[dict], budget_s: float,
              sign: int) -> dict:  # fmt: skip
    def median_seconds(points: float) -> tuple[float, int]:
        found = [seconds_to_within(table, s["curve"], points, sign) for s in seeds]
        return statistics.median(budget_s if f is None else f for f in found), found.count(None)

    seconds, never = median_seconds(WITHIN)
    floor = table.noise_floor()
    gaps = [s["final_gap_points"] for s in seeds if s["final_gap_points"] is not None]
    grid = [budget_s * k / (GRID - 1) for k in range(GRID)]
    anytime = []
    for at in grid:
        values = [best_at(s["seen"], at) for s in seeds]
        values = sorted(table.points * v for v in values if v is not None)
        anytime.append(
            {
                "seconds": at,
                "seeds_with_a_result": len(values),
                "quartiles": _quartiles(values) if values else None,
            }
        )
    return {
        "name": strategy.name,
        "sampler": dataclasses.asdict(strategy.sampler),
        "pruner": dataclasses.asdict(strategy.pruner),
        "default": strategy.default,
        "median_seconds_to_within_0_5": seconds,
        "seeds_never_within_0_5": never,
        # the same at the noise floor (one sd of the final metric over train seeds)
        "median_seconds_to_within_noise_floor": median_seconds(floor["sd_points"])[0]
        if floor
        else None,
        "median_tokens_saved": statistics.median(s["tokens_saved"] for s in seeds),
        "median_final_gap_points": statistics.median(gaps) if gaps else None,
        "median_trials": statistics.median(s["trials"] for s in seeds),
        "median_pruned": statistics.median(s["pruned"] for s in seeds),
        "anytime": anytime,
    }


def _quartiles(values: list[float]) -> list[float]:
    if len(values) == 1:
        return values * 3
    q = statistics.quantiles(values, n=4, method="inclusive")
    return [q[0], statistics.median(values), q[2]]


def replay(
    table_data: dict,
    cfg: Config,
    study_name: str | None,
    seeds: int,
    budget_trials: float,
    strategies: list[str] | None = None,
    seed_noise: bool = False,
    parallel: int = 1,
) -> dict:
    """Every strategy over `seeds` seeds; the JSON object `--json` prints. `seed_noise`: see
    the module's doc (the table's noise floor; a table without seed repeats has none)."""
    table = Table(table_data)
    floor = table.noise_floor()
    if seed_noise and floor is None:
        raise ConfigError("the table has no configuration run with several seeds", "--seed-noise")
    noise_sd = floor["sd_points"] / table.points if seed_noise else 0.0
    loss_sd = table.loss_noise() if seed_noise else None
    study_cfg, default = study_for(table_data, cfg, study_name)
    train = table_data["train"]
    chosen = [default] + [
        s
        for s in alternatives(default.sampler, train["eval_every"], train["max_steps"])
        if (s.sampler, s.pruner) != (default.sampler, default.pruner)
    ]
    if strategies:
        chosen = [s for s in chosen if s.default or s.name in strategies]
    budget_s = budget_trials * table.full_trial_s
    direction = "minimize" if table_data.get("direction") == "minimize" else "maximize"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # experimental-feature notes of multivariate TPE
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        results = [
            summarize(
                table,
                s,
                [
                    replay_one(
                        table, study_cfg, s, seed, budget_s, direction, noise_sd, parallel, loss_sd
                    )
                    for seed in range(seeds)
                ],
                budget_s,
                1 if direction == "maximize" else -1,
            )
            for s in chosen
        ]
    return {
        "table_best": table.best,
        "direction": direction,
        "table_runs": len(table.runs),
        "metric": table_data.get("metric"),
        "points_scale": table.points,
        "budget_trials": budget_trials,
        "budget_seconds": budget_s,
        "full_trial_seconds": table.full_trial_s,
        "seeds": seeds,
        "noise_floor": floor,
        # sd (points) of the seed noise added to what the strategies saw (0: none)
        "seed_noise_points": noise_sd * table.points,
        # sd of the seed noise added to the validation losses the pruner saw, per step
        "seed_noise_val_loss": {str(k): v for k, v in (loss_sd or {}).items()},
        "parallel": parallel,  # trials in flight at once
        "runs_within_0_5": table.share_within(WITHIN),
        "strategies": results,
    }


def live(table: Table, study: optuna.Study, companion: optuna.Study | None, result: dict) -> dict:
    """A real study's anytime curve in the table's currency (`--live`), and whether its best at
    the budget lies within the default strategy's band of `result` (a `replay` result)."""
    sign = -1 if result.get("direction") == "minimize" else 1
    validations = rows.curves(companion)
    spent, best, curve, counted = 0.0, None, [(0.0, None)], {"complete": 0, "pruned": 0}
    for row in sorted(rows.trial_rows(study), key=lambda r: r["number"]):
        if row["state"] not in counted:  # running, failed, infeasible: no recorded cost
            continue
        counted[row["state"]] += 1
        vals = sum(1 for step in validations.get(row["number"], {}) if step <= row["steps"])
        finished = row["state"] == "complete"
        spent += table.seconds(row["train_tokens"], vals, finished)
        if finished and (best is None or sign * row["metric"] > sign * best):
            best = row["metric"]
        curve.append((spent, best))
    budget_s = result["budget_seconds"]
    default = next(s for s in result["strategies"] if s["default"])
    # the band where the live study stopped spending, if before the budget (the grid's last
    # point is the budget): a study cut short is set against replays cut as short
    point = [p for p in default["anytime"] if p["seconds"] <= min(spent, budget_s) + 1e-9][-1]
    band = point["quartiles"]
    at_budget = best_at(curve, budget_s)
    points = None if at_budget is None else at_budget * table.points
    return {
        "study": study.study_name,
        "trials": counted["complete"] + counted["pruned"],
        "pruned": counted["pruned"],
        "spent_s": spent,
        "budget_reached": spent >= budget_s,
        "best_at_budget_points": points,
        "default_band": band,
        "band_at_s": point["seconds"],
        "inside_band": bool(band and points is not None and band[0] <= points <= band[2]),
        "curve": curve,
    }


def study_for(table_data: dict, cfg: Config, name: str | None) -> tuple[Study, Strategy]:
    """The study whose sampler, pruner and space are replayed (its draws snap to the table's
    configurations), and that strategy; one of the table's task. No name: the table's study
    (its space) with [defaults]' sampler and pruner."""
    if name is not None:
        if name not in cfg.studies:
            raise ConfigError(f"no study {name!r} in {cfg.path.name}", "--study")
        study = cfg.studies[name]
        if study.task != table_data.get("task", study.task):  # its metric is another one
            raise ConfigError(
                f"study {name!r} is of task {study.task}, the table of task {table_data['task']}",
                "--study",
            )
        return study, Strategy(name, study.sampler, study.pruner, default=True)
    base = cfg.studies.get(table_data["study"])
    if base is None:
        raise ConfigError(
            f"the table's study {table_data['study']!r} is not in the config", "--table"
        )
    sampler, pruner = default_strategy(cfg)
    study = dataclasses.replace(base, sampler=sampler, pruner=pruner)
    return study, Strategy("default", sampler, pruner, default=True)


def show(result: dict) -> str:
    """Plain-text anytime curves and the summary per strategy."""
    lines = [
        f"table best {result['table_best'] * result['points_scale']:.2f} points over "
        f"{result['table_runs']} configurations; budget {result['budget_trials']:g} full trials "
        f"({result['budget_seconds']:.0f} s); {result['seeds']} seeds"
        + (
            f"; seed noise sd {result['seed_noise_points']:.2f} points in what trials see"
            if result.get("seed_noise_points")
            else ""
        )
        + (f"; {result['parallel']} trials in flight" if result.get("parallel", 1) > 1 else "")
    ]
    if result["noise_floor"]:
        nf = result["noise_floor"]
        lines.append(
            f"noise floor: sd {nf['sd_points']:.2f} points over train seeds "
            f"({nf['configurations']} configurations x {nf['seeds_each']:g} seeds)"
        )
    lines.append(
        f"{100 * result['runs_within_0_5']:.0f} % of the configurations are within {WITHIN} points "
        "of the best"
    )
    for s in result["strategies"]:
        gap = s["median_final_gap_points"]
        lines.append(
            f"\n{s['name']}{' (default)' if s['default'] else ''}: sampler {s['sampler']['name']}, "
            f"pruner {s['pruner']['name']} {s['pruner']['kwargs'] or ''}\n"
            f"  median seconds to within {WITHIN} points: {s['median_seconds_to_within_0_5']:.0f} "
            f"({s['seeds_never_within_0_5']} seeds never: whole budget counted); tokens saved "
            f"{100 * s['median_tokens_saved']:.0f} %; final gap "
            f"{'-' if gap is None else f'{gap:.2f}'} points; trials {s['median_trials']:g} "
            f"(pruned {s['median_pruned']:g})\n  anytime best (points, quartiles):"
        )
        for point in s["anytime"]:
            q = point["quartiles"]
            shown = "-" if q is None else f"{q[1]:.2f} [{q[0]:.2f}, {q[2]:.2f}]"
            lines.append(f"    {point['seconds']:8.0f} s  {shown}")
    if result.get("live"):
        lv, band = result["live"], result["live"]["default_band"]
        best = lv["best_at_budget_points"]
        shown_band = "-" if not band else f"[{band[0]:.2f}, {band[2]:.2f}]"
        lines.append(
            f"\nlive study {lv['study']!r}: {lv['trials']} trials ({lv['pruned']} pruned), "
            f"{lv['spent_s']:.0f} s spent by the cost model"
            + ("" if lv["budget_reached"] else " (less than the budget: the curve ends early)")
            + f"; best at the budget {'-' if best is None else f'{best:.2f}'} points; the "
            f"default strategy's band at {lv['band_at_s']:.0f} s {shown_band}"
            f": {'inside' if lv['inside_band'] else 'outside'}"
        )
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    """Anytime curves (median and interquartile band) per strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for s in result["strategies"]:
        pts = [p for p in s["anytime"] if p["quartiles"]]
        x = [p["seconds"] / 60 for p in pts]
        (line,) = ax.plot(x, [p["quartiles"][1] for p in pts], label=s["name"],
                          linewidth=2.5 if s["default"] else 1.2)  # fmt: skip
        ax.fill_between(x, [p["quartiles"][0] for p in pts], [p["quartiles"][2] for p in pts],
                        alpha=0.12, color=line.get_color())  # fmt: skip
    if result.get("live"):
        pts = [(t, b) for t, b in result["live"]["curve"] if b is not None]
        ax.step([t / 60 for t, _ in pts], [b * result["points_scale"] for _, b in pts],
                where="post", color="k", label=f"live: {result['live']['study']}")  # fmt: skip
    best = result["table_best"] * result["points_scale"]
    ax.axhline(best, color="k", linestyle=":", label="table best")
    ax.axhline(best - WITHIN, color="grey", linestyle=":", linewidth=0.8)
    ax.set_xlabel("GPU minutes (cost model of trials alone)")
    ax.set_ylabel(f"best {result['metric']} so far (points)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
