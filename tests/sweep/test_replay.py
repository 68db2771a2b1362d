"""`sweep replay` on the shipped learning-curve table and on a synthetic one (offline, fast)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

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


@pytest.mark.parametrize(
    "args, says",
    [
        (["--table", "missing.json.xz"], "no such file"),
        (["--table", "README.md"], "not a learning-curve table"),
        (["--table", str(SHIPPED), "--seeds", "0"], "must be > 0"),
        (["--table", str(SHIPPED), "--study", "nope"], "no study 'nope'"),
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
