"""Learning-curve tables (sweep/curves.py): extending one written before with more runs."""

from __future__ import annotations

import pytest

from sweep import curves, replay
from sweep.errors import ConfigError
from tests.sweep.curves_table import synthetic_table


def test_a_table_is_extended_with_new_configurations_and_seed_repeats():
    """New configurations join the table's (storage 0), seed repeats follow its storages, a
    configuration it has already is left out, the cost model stays when none was measured."""
    old = synthetic_table(n=10, seed=0)
    new = synthetic_table(n=6, seed=5, extra_seeds=(1,))
    new["runs"].append(dict(old["runs"][0]))  # drawn again: already in the table
    new["cost"] = None
    table = curves.extend(old, new)
    added = table["runs"][len(old["runs"]) :]
    assert len(added) == 6 + 5 and table["parts"] == 2
    assert [r["storage"] for r in added] == [0] * 6 + [3] * 5  # old had storages 0, 1, 2
    assert all(r["part"] == 1 for r in added) and table["cost"] == old["cost"]
    assert len(replay.Table(table).runs) == 10 + 6  # the configurations replay snaps to
    assert replay.Table(table).noise_floor()["configurations"] == 5 + 5
    again = curves.extend(table, new)  # nothing new: only the part count moves
    assert again["runs"] == table["runs"] and again["parts"] == 3


def test_the_best_configurations_to_repeat_include_the_table_being_extended():
    """`--top-params K --extend TABLE`: the K best of this storage's trials and the table's
    configurations (not its seed repeats), each once, with the model the table trained."""
    import optuna

    old = synthetic_table(n=10, seed=0)
    firsts = sorted((r for r in old["runs"] if r["storage"] == 0), key=lambda r: -r["final"])
    model = {"model": "smollm2-135m"}
    study = optuna.create_study(direction="maximize")
    for value, params in (
        (firsts[0]["final"] + 0.01, {"r": 4, "lr": 1e-4}),  # better than the table's best
        (0.1, {"r": 8, "lr": 2e-4}),
        (firsts[0]["final"], firsts[0]["params"]),  # the table's best drawn again: listed once
    ):
        params = params | model
        dist = {k: optuna.distributions.CategoricalDistribution([v]) for k, v in params.items()}
        study.add_trial(optuna.trial.create_trial(params=params, distributions=dist, value=value))
    best = curves.top_params([study], 3, old)
    assert best == [{"r": 4, "lr": 1e-4} | model] + [r["params"] | model for r in firsts[:2]]
    alone = [t.params for t in sorted(study.trials, key=lambda t: -t.value)]
    assert curves.top_params([study], 3) == alone  # without the table: this storage's


def test_a_table_of_other_training_settings_is_not_extended():
    old, new = synthetic_table(n=4), synthetic_table(n=4, seed=1, steps=30)
    with pytest.raises(ConfigError, match="train"):
        curves.extend(old, new)


@pytest.mark.parametrize("content", [None, b"not xz", b"\xfd7zXZ\x00 cut short", b"{}"])
def test_a_table_to_extend_that_is_missing_or_unreadable_is_one_line(tmp_path, content):
    from tests.conftest import run_cli

    path = tmp_path / ("old.json" if content == b"{}" else "old.json.xz")
    if content is not None:
        path.write_bytes(content)
    out = run_cli("curves", "--study", "sst2-curves", "--extend", str(path), "--out",
                  str(tmp_path / "new.json.xz"))  # fmt: skip
    assert out.returncode == 2 and "--extend" in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and not (tmp_path / "new.json.xz").exists()


@pytest.mark.integration
def test_a_squad_study_becomes_a_table_the_replay_reads(tmp_path, local_config, embedded_model):
    """The second table's study (`squad-curves`, tests/gpu/curves.sh) at toy size on the CPU:
    its trials -> `sweep curves` -> `sweep replay --json`. F1 is kept in points as recorded,
    validations keep their losses and have no accuracy (SQuAD has no choice to score)."""
    import json

    from tests.conftest import run_cli, study_trials

    cfg, storage = str(local_config), f"sqlite:///{tmp_path}/storage/optuna.db"
    toy = [
        "train.max_steps=2", "train.eval_every=1", "train.val_examples=2", "train.batch_size=2",
        "train.max_seq_len=320", "train.gradient_checkpointing=false",
        "train.optimizer=paged_adamw_32bit", "eval.max_examples=4", "eval.max_new_tokens=8",
    ]  # fmt: skip
    sets = [arg for o in toy for arg in ("--set", o)]
    out = run_cli("run", "--study", "squad-curves", "--config", cfg, "--n-trials", "2", *sets)
    assert out.returncode == 0, out.stderr[-3000:]
    trials = study_trials(tmp_path, "squad-curves")
    assert [t.state.name for t in trials] == ["COMPLETE"] * 2

    table_path = tmp_path / "squad.json.xz"
    out = run_cli("curves", "--study", "squad-curves", "--config", cfg, "--storage", storage,
                  "--alone", "0,1", "--out", str(table_path))  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    table = curves.read(table_path)
    assert (table["task"], table["metric"], table["study"]) == ("squad", "f1", "squad-curves")
    assert sorted(r["final"] for r in table["runs"]) == sorted(t.values[0] for t in trials)
    for run in table["runs"]:
        assert [v[0] for v in run["val"]] == [1, 2] and all(v[2] is None for v in run["val"])
        assert all(v[1] > 0 for v in run["val"]) and len(run["tokens"]) == 2

    out = run_cli("replay", "--table", str(table_path), "--config", cfg, "--seeds", "2",
                  "--budget", "2", "--json")  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    assert result["table_best"] == pytest.approx(max(t.values[0] for t in trials))
    names = {s["name"]: s for s in result["strategies"]}
    assert names["random-no-pruning"]["default"] is False
    assert [s["default"] for s in result["strategies"]].count(True) == 1
