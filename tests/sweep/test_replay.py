"""`sweep replay` on the shipped learning-curve table and on a synthetic one (offline, fast)."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from sweep import config, curves, replay
from tests.conftest import ROOT, run_cli
from tests.sweep.curves_table import synthetic_table

SHIPPED = ROOT / "docs" / "curves" / "sst2-smollm2.json.xz"


def test_replay_of_the_shipped_table_as_json():
    out = run_cli(
        "replay", "--table", str(SHIPPED), "--seeds", "3", "--budget", "8", "--json",
        "--strategies", "random-no-pruning,tpe-no-pruning",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    table = curves.read(SHIPPED)
    assert result["table_best"] == max(r["final"] for r in table["runs"] if r["storage"] == 0)
    by_name = {s["name"]: s for s in result["strategies"]}
    assert set(by_name) == {"default", "random-no-pruning", "tpe-no-pruning"}
    assert by_name["default"]["default"] and not by_name["random-no-pruning"]["default"]
    assert by_name["default"]["pruner"]["name"] == "MedianPruner"  # [defaults] in sweep.toml
    assert by_name["random-no-pruning"]["median_tokens_saved"] == 0
    assert by_name["default"]["median_tokens_saved"] > 0.3  # the pruner stops trials
    for s in result["strategies"]:
        assert 0 <= s["median_seconds_to_within_0_5"] <= result["budget_seconds"] + 200
        assert s["median_final_gap_points"] >= 0
    assert result["noise_floor"]["configurations"] == 10  # the 10 best, three seeds each


def test_seed_noise_is_seen_by_the_search_but_the_recorded_value_is_what_counts():
    """`--seed-noise`: trials see the metric plus seed noise at the table's noise floor, so a
    search's best seen may pass the table's best (as a live study's does); the final gap and
    "within 0.5 points" count the recorded value of the configuration it would hand over."""
    out = run_cli(
        "replay", "--table", str(SHIPPED), "--seeds", "3", "--budget", "8", "--json",
        "--strategies", "random-no-pruning", "--seed-noise",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    assert result["seed_noise_points"] == pytest.approx(result["noise_floor"]["sd_points"])
    best = result["table_best"] * result["points_scale"]
    seen = [p["quartiles"][2] for s in result["strategies"] for p in s["anytime"] if p["quartiles"]]
    assert max(seen) > best  # noise lifted a best seen above every recorded value
    for s in result["strategies"]:
        assert s["median_final_gap_points"] >= 0  # recorded values: never above the best
    quiet = json.loads(run_cli(
        "replay", "--table", str(SHIPPED), "--seeds", "3", "--budget", "8", "--json",
        "--strategies", "random-no-pruning",
    ).stdout)  # fmt: skip
    assert quiet["seed_noise_points"] == 0
    assert float(result["seed_noise_val_loss"]["10"]) > 0 and quiet["seed_noise_val_loss"] == {}
    assert max(p["quartiles"][2] for s in quiet["strategies"] for p in s["anytime"]
               if p["quartiles"]) <= best + 1e-9  # fmt: skip


def test_seed_noise_reaches_the_validation_losses_the_pruner_sees(monkeypatch):
    """The table's seed repeats give each validation step's seed sd (the synthetic curves
    carry sd 0.01); with it the pruner sees noisy losses, none of them a recorded one, where
    without it every reported loss is one the table recorded."""
    data = synthetic_table()
    table = replay.Table(data)
    sd = table.loss_noise()
    assert list(sd) == [v[0] for v in table.runs[0]["val"]]
    assert all(0.003 < v < 0.03 for v in sd.values())
    recorded = {(v[0], v[1]) for r in data["runs"] for v in r["val"]}
    reported = []
    report = optuna.trial.Trial.report
    monkeypatch.setattr(
        optuna.trial.Trial, "report",
        lambda self, value, step: reported.append((step, value)) or report(self, value, step),
    )  # fmt: skip
    study, default = replay.study_for(data, config.load(ROOT / "sweep.toml"), None)
    for loss_sd, seen_recorded in ((None, True), (sd, False)):
        reported.clear()
        replay.replay_one(table, study, default, 0, 10 * table.full_trial_s, "maximize",
                          loss_sd=loss_sd)  # fmt: skip
        assert reported and all((r in recorded) == seen_recorded for r in reported)


def test_trials_in_flight_are_asked_before_their_neighbours_results():
    """`--parallel 8`: eight trials start before any result is in, so the pruner (which needs
    4 finished trials) lets more of the early ones run on, and tokens saved drop; the budget
    still bounds what is counted (trials in flight at the budget are cut)."""
    data = curves.read(SHIPPED)
    table = replay.Table(data)
    study, default = replay.study_for(data, config.load(ROOT / "sweep.toml"), None)
    budget = 10 * table.full_trial_s
    one, eight = (replay.replay_one(table, study, default, 0, budget, "maximize", 0.0, n)
                  for n in (1, 8))  # fmt: skip
    assert eight["tokens_saved"] < one["tokens_saved"]
    for r in (one, eight):
        assert budget <= r["spent_s"] < budget + table.full_trial_s
        assert [c[0] for c in r["curve"]] == sorted(c[0] for c in r["curve"])


def test_seed_noise_needs_seed_repeats_in_the_table(tmp_path):
    table = tmp_path / "one-seed.json.xz"
    curves.write(synthetic_table(n=5, extra_seeds=()), table)
    out = run_cli("replay", "--table", str(table), "--seeds", "1", "--seed-noise")
    assert out.returncode == 2 and "several seeds" in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_snapping_and_costs_on_a_synthetic_table():
    data = synthetic_table()
    table = replay.Table(data)
    for run in table.runs[:10]:
        assert table.snap(run["params"]) is run
        with_alpha = {
            **run["params"],
            "lora_alpha": run["params"]["alpha_multiple"] * run["params"]["r"],
        }
        assert table.snap(with_alpha) is run
    run = table.runs[0]
    full, tokens = table.cost(run, None)
    early, early_tokens = table.cost(run, data["train"]["eval_every"])
    assert early < full and early_tokens == run["tokens"][9] < tokens == run["tokens"][-1]
    assert full == pytest.approx(
        table.start_s + tokens / table.rate + len(run["val"]) * table.val_s + table.finish_s
    )


def test_replay_is_deterministic_and_pruning_saves_tokens(tmp_path):
    cfg = config.load(ROOT / "sweep.toml")
    data = synthetic_table()
    one = replay.replay(data, cfg, None, 4, 12, ["random-no-pruning", "tpe-successive-halving"])
    two = replay.replay(data, cfg, None, 4, 12, ["random-no-pruning", "tpe-successive-halving"])
    assert one == two
    by_name = {s["name"]: s for s in one["strategies"]}
    assert by_name["tpe-successive-halving"]["median_tokens_saved"] > 0.3
    assert (
        by_name["tpe-successive-halving"]["median_trials"]
        > by_name["random-no-pruning"]["median_trials"]
    )  # pruned trials are cheap: more of them fit the budget
    assert "quartiles" in by_name["default"]["anytime"][-1]
    replay.plot(one, tmp_path / "anytime.png")
    assert (tmp_path / "anytime.png").stat().st_size > 10_000


def _live_study(url: str) -> list[tuple]:
    """A study of the table's name as the sweep stores one, without training: two finished
    trials and one pruned at step 20 (training tokens and steps on the trial, validation
    losses on the companion's mirror trials). Returns (state, tokens, validations, metric)."""
    made = [("complete", 287_360, 30, 0.85), ("pruned", 19_150, 2, None),
            ("complete", 287_360, 30, 0.89)]  # fmt: skip
    study = optuna.create_study(
        study_name="sst2-curves", storage=url, directions=["maximize", "minimize"]
    )
    companion = optuna.create_study(study_name="sst2-curves--val-loss", storage=url)
    lr = FloatDistribution(1e-5, 3e-3, log=True)
    for number, (state, tokens, vals, metric) in enumerate(made):
        steps = 300 if state == "complete" else 20
        study.add_trial(
            create_trial(
                state=TrialState.COMPLETE if metric else TrialState.PRUNED,
                values=[metric, 3.0] if metric else None,
                params={"lr": 1e-4}, distributions={"lr": lr},
                user_attrs={"train_tokens": tokens, "steps": steps},
            )
        )  # fmt: skip
        companion.add_trial(
            create_trial(
                state=TrialState.COMPLETE if metric else TrialState.PRUNED,
                value=1.0 if metric else None,
                intermediate_values={10 * (k + 1): 1.0 for k in range(vals)},
                user_attrs={"trial_number": number},
            )
        )
    return made


def test_a_live_study_is_costed_like_the_table_and_set_against_the_band(tmp_path):
    url = f"sqlite:///{tmp_path / 'live.db'}"
    made = _live_study(url)
    out = run_cli(
        "replay", "--table", str(SHIPPED), "--seeds", "3", "--budget", "8", "--json",
        "--strategies", "random-no-pruning", "--live", url,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    lv, table = result["live"], replay.Table(curves.read(SHIPPED))
    assert (lv["trials"], lv["pruned"]) == (3, 1)
    expected = sum(
        table.start_s + tokens / table.rate + vals * table.val_s
        + (table.finish_s if state == "complete" else 0.0)
        for state, tokens, vals, _ in made
    )  # fmt: skip
    assert lv["spent_s"] == pytest.approx(expected)
    assert lv["budget_reached"] is (expected >= result["budget_seconds"])
    assert lv["best_at_budget_points"] == pytest.approx(89.0)  # the budget (8 trials) not spent
    # the band where the live study stopped spending (the last grid point before it)
    anytime = next(s for s in result["strategies"] if s["default"])["anytime"]
    at = [p for p in anytime if p["seconds"] <= min(expected, result["budget_seconds"])][-1]
    assert at["seconds"] < result["budget_seconds"]  # three trials of eight: cut short
    band = at["quartiles"]
    assert (lv["default_band"], lv["band_at_s"]) == (band, at["seconds"])
    assert lv["inside_band"] is (band[0] <= 89.0 <= band[2])
    shown = run_cli(
        "replay", "--table", str(SHIPPED), "--seeds", "3", "--budget", "8",
        "--strategies", "random-no-pruning", "--live", url,
    )  # fmt: skip
    assert "live study 'sst2-curves': 3 trials (1 pruned)" in shown.stdout


@pytest.mark.parametrize(
    "args, says",
    [
        (["--table", str(SHIPPED), "--live", "sqlite:///nowhere.db"], "no such database"),
        (["--table", str(SHIPPED), "--live", "sqlite:///README.md"], "not an Optuna storage"),
        (["--table", "missing.json.xz"], "no such file"),
        (["--table", "README.md"], "not a learning-curve table"),
        (["--table", "docs/curves/sst2-smollm2-anytime.png"], "not a learning-curve table"),
        (["--table", "sweep.toml"], "not a learning-curve table"),
        (["--table", str(SHIPPED), "--seeds", "0"], "must be > 0"),
        (["--table", str(SHIPPED), "--parallel", "0"], "--parallel must be > 0"),
        (["--table", str(SHIPPED), "--study", "nope"], "no study 'nope'"),
        (["--table", str(SHIPPED), "--study", "demo-squad"], "the table of task sst2"),
    ],
)
def test_bad_replay_input_is_one_line(args, says):
    out = run_cli("replay", *args)
    assert out.returncode == 2 and says in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_curves_table_round_trips(tmp_path: Path):
    data = synthetic_table(n=5)
    curves.write(data, tmp_path / "t.json.xz")
    assert curves.read(tmp_path / "t.json.xz") == data
