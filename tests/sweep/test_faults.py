"""Faults injected into real sweeps (tiny random Qwen2, real SST-2 rows): no finished trial is
ever lost, and every failure says why."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import time

import optuna
import pytest

from sweep import checks
from tests.conftest import run_cli, start_sweep, study_trials, trial_folder, write_config


def _child_pid(spec) -> int:
    """The trial process of `spec`, once it has started training."""
    deadline = time.monotonic() + 120
    log = spec.parent / "stdout.log"
    while True:
        found = subprocess.run(["pgrep", "-f", str(spec)], capture_output=True, text=True).stdout
        if found and log.exists() and "SWEEP_PROGRESS" in log.read_text():
            return int(found.split()[0])
        assert time.monotonic() < deadline, "trial process never started"
        time.sleep(0.5)


def _alive(spec) -> str:
    return subprocess.run(["pgrep", "-f", str(spec)], capture_output=True, text=True).stdout


def _mlflow_status(folder) -> dict[str, str]:
    db = sqlite3.connect(folder / "storage" / "mlflow.db")
    return dict(db.execute("select name, status from runs").fetchall())


def test_kill_9_of_the_sweep_then_resume_retries_the_orphan(tmp_path, tiny_model, shared_data):
    cfg = write_config(tmp_path, tiny_model, shared_data, extra="heartbeat_s = 1")
    first = run_cli("run", "--study", "tiny", "--config", str(cfg), "--n-trials", "1")
    assert first.returncode == 0, first.stderr[-2000:]
    finished = study_trials(tmp_path)[0]
    adapter = trial_folder(tmp_path, 0) / "adapter/adapter_model.safetensors"
    adapter_bytes = adapter.read_bytes()

    sweep = start_sweep(cfg, "train.max_steps=100000")
    spec = trial_folder(tmp_path, 1) / "spec.json"
    try:
        _child_pid(spec)
        sweep.kill()  # SIGKILL: no handler of ours runs
        sweep.wait()
        time.sleep(3)  # > 2 heartbeats: the trial is stale
        assert _alive(spec) == ""  # its trial process died with it
        again = run_cli("run", "--study", "tiny", "--config", str(cfg), "--n-trials", "1")
    finally:
        sweep.kill()
        subprocess.run(["pkill", "-9", "-f", str(spec)])
    assert again.returncode == 0, again.stderr[-2000:]
    assert "trial 1: its sweep died; marked failed, queued again" in again.stdout
    trials = study_trials(tmp_path)
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE"]
    assert trials[2].params == trials[1].params  # the retry: same parameters
    assert trials[2].system_attrs["failed_trial"] == 1
    assert trials[0].values == finished.values and adapter.read_bytes() == adapter_bytes
    runs = _mlflow_status(tmp_path)
    assert runs["trial-0"] == "FINISHED" and runs["trial-1"] == "FAILED"
    assert runs["trial-2"] == "FINISHED"


@pytest.mark.parametrize("storage", ["sqlite", "journal"])
def test_restart_right_after_kill_9_retries_the_orphan_at_once(
    tmp_path, tiny_model, shared_data, storage
):
    """Issue 18: kill -9 mid-trial, `sweep run` again within 5 s (the heartbeat, 30 s by
    default, is still fresh; a journal has none): the orphan's owner is provably gone (same
    host, its process dead), so it is failed and queued again during the second run."""
    cfg = write_config(tmp_path, tiny_model, shared_data)
    url = f"journal:{tmp_path}/storage/optuna.journal" if storage == "journal" else None
    sweep = start_sweep(cfg, "train.max_steps=100000", storage=url)
    spec = trial_folder(tmp_path, 0) / "spec.json"
    try:
        _child_pid(spec)
        sweep.kill()  # SIGKILL: no handler of ours runs
        sweep.wait()
        killed = time.monotonic()
        args = ["run", "--study", "tiny", "--config", str(cfg), "--n-trials", "1"]
        again = run_cli(*args, *(["--storage", url] if url else []))
        assert time.monotonic() - killed < 600
    finally:
        sweep.kill()
        subprocess.run(["pkill", "-9", "-f", str(spec)])
    assert again.returncode == 0, again.stderr[-2000:]
    assert "trial 0: its sweep died; marked failed, queued again" in again.stdout
    assert _alive(spec) == ""  # no process of the first sweep is left
    opened = optuna.load_study(
        study_name="tiny",
        storage=checks.make_storage(url) if url else f"sqlite:///{tmp_path}/storage/optuna.db",
    )
    trials = opened.trials
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"]
    assert trials[1].params == trials[0].params  # the retry: same parameters


def test_crashed_trial_process_fails_with_its_reason_and_the_sweep_goes_on(
    tmp_path, tiny_model, shared_data
):
    cfg = write_config(tmp_path, tiny_model, shared_data)
    sweep = start_sweep(cfg, "train.max_steps=100000", "n_trials=1")
    spec = trial_folder(tmp_path, 0) / "spec.json"
    try:
        os.kill(_child_pid(spec), signal.SIGSEGV)
        sweep.communicate(timeout=120)
    finally:
        sweep.kill()
        subprocess.run(["pkill", "-9", "-f", str(spec)])
    assert sweep.returncode == 0
    (trial,) = study_trials(tmp_path)
    assert trial.state.name == "FAIL" and trial.user_attrs["reason"] == "crash"
    assert trial.user_attrs["error"].startswith("crash: killed by SIGSEGV")
    db = sqlite3.connect(tmp_path / "storage" / "mlflow.db")
    (error,) = db.execute("select value from tags where key='error'").fetchone()
    assert "SIGSEGV" in error

    then = run_cli("run", "--study", "tiny", "--config", str(cfg), "--n-trials", "1")
    assert then.returncode == 0 and study_trials(tmp_path)[1].state.name == "COMPLETE"


def test_over_the_memory_budget_is_infeasible_not_failed(tmp_path, tiny_model, shared_data):
    """A 0.05 GiB budget no trial process fits in: deterministic on any machine."""
    cfg = write_config(tmp_path, tiny_model, shared_data, extra="vram_budget_gb = 0.05")
    out = run_cli("run", "--study", "tiny", "--config", str(cfg), "--n-trials", "1")
    assert out.returncode == 0, out.stderr[-2000:]
    (trial,) = study_trials(tmp_path)
    assert trial.state.name == "COMPLETE" and trial.user_attrs["reason"] == "over_budget"
    assert trial.constraints["vram_budget_gb"] == trial.values[1] - 0.05 > 0
    status = run_cli("status", "--study", "tiny", "--config", str(cfg))
    assert "infeasible (over_budget)" in status.stdout and "budget 0.05 GiB" in status.stdout


def test_hung_trial_times_out(tmp_path, tiny_model, shared_data):
    cfg = write_config(tmp_path, tiny_model, shared_data, extra="trial_timeout_s = 20.0")
    out = run_cli(
        "run", "--study", "tiny", "--config", str(cfg), "--n-trials", "1",
        "--set", "train.max_steps=100000",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    spec = trial_folder(tmp_path, 0) / "spec.json"
    (trial,) = study_trials(tmp_path)
    assert trial.state.name == "FAIL" and trial.user_attrs["reason"] == "timeout"
    assert _alive(spec) == ""


def test_sqlite_in_wal_mode_and_only_plain_files_cross_processes(tmp_path, tiny_model, shared_data):
    """WAL lets readers in while the sweep writes; spec/result are JSON, weights safetensors."""
    cfg = write_config(tmp_path, tiny_model, shared_data)
    out = run_cli("run", "--study", "tiny", "--config", str(cfg), "--n-trials", "1")
    assert out.returncode == 0, out.stderr[-2000:]
    for name in ("optuna.db", "mlflow.db"):
        db = sqlite3.connect(tmp_path / "storage" / name)
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    folder = trial_folder(tmp_path, 0)
    assert json.loads((folder / "spec.json").read_text())["model"]["trust_remote_code"] is False
    assert (folder / "adapter" / "adapter_model.safetensors").is_file()
    assert not [p for p in folder.rglob("*") if p.suffix in (".bin", ".pt", ".pkl", ".pth")]


def test_api_key_never_stored_or_logged(tmp_path, tiny_model, shared_data):
    secret = "sk-do-not-leak-4f9a1c"
    judge = '{ name = "openai", model = "m", base_url = "http://127.0.0.1:9/v1", api_key_env = "SWEEP_TEST_KEY" }'  # noqa: E501
    cfg = write_config(tmp_path, tiny_model, shared_data)
    text = cfg.read_text().replace('task = "sst2"', 'task = "alpacaeval"')
    text = text.replace(
        "eval = { max_examples = 16, batch_size = 16 }",
        f"eval = {{ max_examples = 2, max_new_tokens = 2, judge = {judge} }}",
    )
    cfg.write_text(text)
    out = run_cli(
        "run", "--study", "tiny", "--config", str(cfg), "--n-trials", "1",
        env={"SWEEP_TEST_KEY": secret, "HF_TOKEN": "hf_also_secret_77"},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    (trial,) = study_trials(tmp_path)
    assert "APIConnectionError" in trial.user_attrs["objective_fallback"]
    leaks = [
        str(p)
        for p in (tmp_path / "storage").rglob("*")
        if p.is_file()
        and (secret.encode() in p.read_bytes() or b"hf_also_secret" in p.read_bytes())
    ]
    assert leaks == [] and secret not in out.stdout + out.stderr


def test_an_artifact_store_that_vanishes_mid_run_loses_nothing(tmp_path, tiny_model, shared_data):
    """The MLflow artifact store disappears (a file now stands where its folder was) while
    the first trial trains: both trials stay COMPLETE with their adapters on disk, each says
    the failed upload once, and the next `sweep run` uploads what is missing."""
    cfg = write_config(tmp_path, tiny_model, shared_data)
    store = tmp_path / "storage" / "mlartifacts"
    sweep = start_sweep(cfg, "train.max_steps=30", "train.eval_every=10")
    try:
        _child_pid(trial_folder(tmp_path, 0) / "spec.json")  # training
        shutil.rmtree(store, ignore_errors=True)  # MLflow may not have made it yet
        store.write_text("not a folder any more")
        out, err = sweep.communicate(timeout=600)
    finally:
        sweep.kill()
    assert sweep.returncode == 0, err[-3000:]
    trials = study_trials(tmp_path)
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    assert out.count("MLflow upload failed") == 2, out
    for trial in trials:
        folder = trial_folder(tmp_path, trial.number)
        assert (folder / "adapter" / "adapter_model.safetensors").is_file()
        saved = json.loads((folder / "result.json").read_text())
        assert saved["metrics"]["accuracy"] == trial.values[0]

    store.unlink()  # the store is back
    again = run_cli("run", "--study", "tiny", "--config", str(cfg), "--n-trials", "1")
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("uploaded to MLflow now") == 2, again.stdout
    for trial in trials:
        run_id = trial.user_attrs["mlflow_run_id"]
        assert list(store.glob(f"*/{run_id}/artifacts/adapter/adapter_model.safetensors"))
    assert _mlflow_status(tmp_path)  # the tracking database is readable


def test_a_trial_another_sweep_failed_meanwhile_keeps_its_result(tmp_path, tiny_model, shared_data):
    """Another sweep on the same storage can judge a running trial dead (its heartbeat went
    stale while this host stalled) and fail it; when the trial then finishes, its result is
    stored as a trial of its own with one line, not a traceback from Optuna's tell."""
    cfg = write_config(tmp_path, tiny_model, shared_data)
    sweep = start_sweep(cfg, "train.max_steps=60", "n_trials=1")
    spec = trial_folder(tmp_path, 0) / "spec.json"
    try:
        _child_pid(spec)  # training: the other sweep fails it now, as fail_orphans does
        storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path}/storage/optuna.db")
        study = optuna.load_study(study_name="tiny", storage=storage)
        (running,) = study.get_trials(states=(optuna.trial.TrialState.RUNNING,))
        storage.set_trial_state_values(running._trial_id, state=optuna.trial.TrialState.FAIL)
        out, err = sweep.communicate(timeout=240)
    finally:
        sweep.kill()
        subprocess.run(["pkill", "-9", "-f", str(spec)])
    assert sweep.returncode == 0 and "Traceback" not in err, err[-2000:]
    assert "trial 0: another sweep on this storage marked it failed while it ran" in out
    assert "its result is stored as trial 1" in out
    failed, kept = study_trials(tmp_path)
    assert failed.state.name == "FAIL" and kept.state.name == "COMPLETE"
    assert kept.params == failed.params and kept.user_attrs["taken_over_from"] == 0
    assert kept.user_attrs["steps"] == 60 and 0.0 <= kept.values[0] <= 1.0
    assert kept.values[1] == kept.user_attrs["peak_memory_gib"] > 0
    assert kept.user_attrs["mlflow_run_id"] == failed.user_attrs["mlflow_run_id"]
    assert "vram_budget_gb" in kept.constraints
    assert _mlflow_status(tmp_path)["trial-0"] == "FINISHED"
