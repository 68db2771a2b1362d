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
