"""Issue 18: any malformed sweep.toml is accepted, or refused with one line naming the key
(the TOML line and column for a syntax error), never another exception. The shipped
sweep.toml is mutated by Hypothesis (seeded: the same 1,000 cases every run) and each case
goes through the config loader and the pre-run checks in-process; no trial starts."""

from __future__ import annotations

import copy
import tomllib
from pathlib import Path

import pytest
import tomli_w
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from sweep import checks, config
from sweep.errors import ConfigError
from tests.conftest import ROOT

SHIPPED = tomllib.loads((ROOT / "sweep.toml").read_text())


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _paths(value, (*prefix, i))


PATHS = list(_paths(SHIPPED))[1:]
SCALARS = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.booleans(),
    st.sampled_from(["qlora", "TPESampler", "MedianPruner", "sst2", "auto", "", "../x"]),
)
VALUES = st.one_of(
    SCALARS,
    st.lists(SCALARS, max_size=3),
    st.dictionaries(st.text(min_size=1, max_size=6), SCALARS, max_size=3),
    st.just({}),
    st.just([]),
)
MUTATIONS = st.sampled_from(["replace", "delete", "extra", "wrap_list", "wrap_table", "empty"])


def _anchored(raw: dict, folder: Path) -> dict:
    """The shipped config as it reads from the checkout, written elsewhere: data folders
    absolute (they are relative to sweep.toml), storage and caches inside `folder`."""
    raw = copy.deepcopy(raw)
    for table in raw.get("studies", {}).values():
        if isinstance(table.get("data"), dict) and "dir" in table["data"]:
            table["data"]["dir"] = str((ROOT / table["data"]["dir"]).resolve())
    storage = raw.setdefault("storage", {})
    for key, value in list(storage.items()):
        storage[key] = (
            value.replace("sqlite:///", f"sqlite:///{folder}/")
            if value.startswith("sqlite:///")
            else str(folder / value)
        )
    return raw


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def _mutate(raw: dict, path: tuple, how: str, value):
    value = copy.deepcopy(value)  # st.just({}) hands out one object: never share it
    *parents, leaf = path
    node = raw
    for part in parents:
        node = node[part]
    if how == "delete" and isinstance(node, dict):
        del node[leaf]
    elif how == "delete":
        node.pop(leaf)
    elif how == "extra" and isinstance(node[leaf], dict):
        node[leaf]["no_such_key"] = value
    elif how == "wrap_list":
        node[leaf] = [node[leaf]]
    elif how == "wrap_table":
        node[leaf] = {"value": node[leaf]}
    elif how == "empty":
        node[leaf] = {} if isinstance(node[leaf], dict) else []
    else:
        node[leaf] = value


def _check(path: Path) -> None:
    """The loader and the pre-run checks of every study: accepted, or one ConfigError line."""
    try:
        cfg = config.load(path)
        for study in cfg.studies.values():
            checks.before_run(cfg, study, None)
    except ConfigError as err:
        assert "\n" not in str(err).strip(), str(err)
        assert str(err).strip(), "an empty message"
        event(f"refused: {err.key.split('.')[0] or 'toml'}")
    else:
        event("accepted")


@settings(
    max_examples=1000,
    derandomize=True,  # the same cases every run: a failure is reproducible
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    database=None,
)
@given(st.lists(st.tuples(st.sampled_from(PATHS), MUTATIONS, VALUES), min_size=1, max_size=3))
def test_a_mutated_config_is_accepted_or_one_line(folder, mutations):
    raw = _anchored(SHIPPED, folder)
    for path, how, value in mutations:
        try:
            _mutate(raw, path, how, value)
        except (KeyError, IndexError, TypeError, AttributeError):
            continue  # an earlier mutation removed or reshaped this path (a scalar: no pop)
    try:
        text = tomli_w.dumps(raw)
    except (TypeError, ValueError):
        event("not TOML")
        return  # not expressible in TOML (tomli_w's own limits)
    target = folder / "sweep.toml"
    target.write_text(text)
    _check(target)


@settings(max_examples=60, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
@given(st.integers(min_value=0, max_value=10_000), st.binary(min_size=1, max_size=8))
def test_broken_bytes_are_one_line(folder, at, junk):
    """Non-UTF-8 bytes and truncated or spliced text: TOML errors name line and column."""
    data = tomli_w.dumps(_anchored(SHIPPED, folder)).encode()
    at %= len(data)
    target = folder / "sweep.toml"
    target.write_bytes(data[:at] + junk + data[at + len(junk) :])
    _check(target)


def test_top_level_tables_of_the_wrong_type(folder):
    for text, key in (("studies = 5", "studies"), ("models = []", "models"),
                      ("defaults = 'x'", "defaults"), ("storage = 3", "storage")):  # fmt: skip
        target = folder / "sweep.toml"
        target.write_text(text + "\n")
        with pytest.raises(ConfigError) as err:
            config.load(target)
        assert str(err.value).startswith(f"{key}: expected dict")


@settings(max_examples=24, derandomize=True, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))  # fmt: skip
@given(st.tuples(st.sampled_from(PATHS), MUTATIONS, VALUES))
def test_mutated_configs_through_the_command_line(folder, mutation):
    """`sweep run --dry-run` as a user runs it: exit 0 or 2 with one line, storage untouched."""
    from tests.conftest import run_cli
    from tests.sweep.test_cli import _snapshot

    raw = _anchored(SHIPPED, folder)
    try:
        _mutate(raw, *mutation)
        text = tomli_w.dumps(raw)
    except (KeyError, IndexError, TypeError, ValueError):
        return
    target = folder / "sweep.toml"
    target.write_text(text)
    storage = folder / "storage"
    storage.mkdir(exist_ok=True)
    (storage / "keep.txt").write_text("finished work")
    before = _snapshot(storage)
    out = run_cli("run", "--config", str(target), "--study", "demo", "--dry-run")
    assert out.returncode in (0, 2), out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    if out.returncode == 2:
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert _snapshot(storage) == before
