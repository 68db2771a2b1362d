"""Several trials at once (`--jobs`), and several sweep processes on one study: PostgreSQL
(the server .ci/run starts, SWEEP_TEST_POSTGRES) and Optuna's journal file."""

from __future__ import annotations

import os
import uuid

import optuna
import pytest
from optuna.trial import TrialState

from tests.conftest import run_cli, start_sweep, study_folder, write_config

POSTGRES = os.environ.get("SWEEP_TEST_POSTGRES")


def test_jobs_run_trials_at_once_and_status_says_so(tmp_path, tiny_model, shared_data):
    cfg = write_config(tmp_path, tiny_model, shared_data)
    out = run_cli("run", "--study", "tiny", "--config", str(cfg), "--n-trials", "4",
                  "--jobs", "2")  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "up to 2 trials at once" in out.stdout
    storage = f"sqlite:///{tmp_path}/storage/optuna.db"
    trials = optuna.load_study(study_name="tiny", storage=storage).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    spans = [(t.datetime_start, t.datetime_complete) for t in trials]
    overlaps = sum(a[0] < b[1] and b[0] < a[1] for i, a in enumerate(spans) for b in spans[i + 1 :])
    assert overlaps >= 2  # two at a time, not one after the other
    status = run_cli("status", "--study", "tiny", "--config", str(cfg))
    assert "concurrency: up to 2 trials at once" in status.stdout


@pytest.fixture
def postgres_urls():
    """Two fresh databases (Optuna, MLflow) on the test server; dropped afterwards."""
    if not POSTGRES:
        if os.environ.get("CI"):
            pytest.fail("SWEEP_TEST_POSTGRES is not set: .ci/run starts PostgreSQL for this test")
        pytest.skip("no PostgreSQL: export SWEEP_TEST_POSTGRES=$(bash tests/postgres.sh start)")
    import psycopg

    names = [f"sweep_{kind}_{uuid.uuid4().hex[:8]}" for kind in ("optuna", "mlflow")]
    with psycopg.connect(POSTGRES + "/postgres", autocommit=True) as conn:
        for name in names:
            conn.execute(f"CREATE DATABASE {name}")
    yield [f"{POSTGRES}/{name}" for name in names]
    with psycopg.connect(POSTGRES + "/postgres", autocommit=True) as conn:
        for name in names:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def _two_sweeps(cfg, storage: str, each: int = 4) -> list:
    """Two sweep processes on one study at the same time; their (returncode, stderr)."""
    # no pruner: the two sweeps draw different configurations (a resumed seeded sampler moves
    # on), and a median pruner may then stop one, which is not what this test is about
    sets = (f"n_trials={each}", 'pruner={name="NopPruner"}')
    sweeps = [start_sweep(cfg, *sets, storage=storage) for _ in range(2)]
    outputs = [p.communicate(timeout=900) for p in sweeps]
    return [(p.returncode, err) for p, (_, err) in zip(sweeps, outputs, strict=True)]


def _check_shared(study: optuna.Study, ended: list, trials_dir) -> None:
    for code, err in ended:
        assert code == 0, err[-3000:]
        assert "locked" not in err.lower() and "Traceback" not in err, err[-3000:]
    numbers = [t.number for t in study.trials]
    assert sorted(numbers) == list(range(8))  # none lost, none twice
    assert all(t.state == TrialState.COMPLETE for t in study.trials), [
        (t.number, t.state.name) for t in study.trials
    ]
    assert len({t.user_attrs["mlflow_run_id"] for t in study.trials}) == 8
    assert sorted(int(p.name) for p in trials_dir.iterdir()) == list(range(8))


def test_two_sweeps_on_postgresql(tmp_path, tiny_model, shared_data, postgres_urls):
    optuna_url, mlflow_url = postgres_urls
    extra = f'[storage]\noptuna = "{optuna_url}"\nmlflow = "{mlflow_url}"\n'
    cfg = write_config(tmp_path, tiny_model, shared_data, extra=extra)
    ended = _two_sweeps(cfg, optuna_url)
    url = optuna_url.replace("postgresql://", "postgresql+psycopg://")
    study = optuna.load_study(study_name="tiny", storage=url)
    _check_shared(study, ended, study_folder(tmp_path))


def test_two_sweeps_on_a_journal_file(tmp_path, tiny_model, shared_data):
    cfg = write_config(tmp_path, tiny_model, shared_data)
    journal = tmp_path / "storage" / "optuna.journal"
    ended = _two_sweeps(cfg, f"journal:{journal}")
    backend = optuna.storages.journal.JournalFileBackend(str(journal))
    study = optuna.load_study(study_name="tiny", storage=optuna.storages.JournalStorage(backend))
    _check_shared(study, ended, study_folder(tmp_path))
