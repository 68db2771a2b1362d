"""How a trial's end becomes an Optuna outcome: success, infeasible, failed, pruned."""

from __future__ import annotations

import signal

import optuna
import pytest

from sweep import trial_process
from sweep.results import Status, TrialResult
from sweep.trial import Watch, outcome, tell


def test_result_file_wins_when_the_process_exited_cleanly(tmp_path):
    TrialResult(Status.SUCCESS, metrics={"accuracy": 0.8}).save(tmp_path / "result.json")
    assert outcome("exited", 0, tmp_path, {}).metrics == {"accuracy": 0.8}


@pytest.mark.parametrize(
    ("ended", "code", "oom", "status", "first_line"),
    [
        ("exited", -signal.SIGSEGV, False, Status.FAILED, "crash: killed by SIGSEGV"),
        ("exited", 1, False, Status.FAILED, "crash (exit status 1)"),
        ("exited", -signal.SIGKILL, False, Status.FAILED, "crash: killed by SIGKILL"),
        ("exited", -signal.SIGKILL, True, Status.INFEASIBLE, "oom: killed by the kernel"),
        ("timeout", -signal.SIGTERM, False, Status.FAILED, "timeout"),
        ("interrupted", -signal.SIGTERM, False, Status.FAILED, "interrupted"),
    ],
)
def test_why_a_trial_ended(tmp_path, ended, code, oom, status, first_line):
    (tmp_path / "stderr.log").write_text("Traceback...\nValueError: boom\n")
    result = outcome(ended, code, tmp_path, {"val_loss": 1.5, "step": 4}, oom_killed=oom)
    assert result.status == status and result.error.startswith(first_line)
    assert "ValueError: boom" in result.error and result.last_val_loss == 1.5


def test_pruned_when_the_sweep_stopped_it(tmp_path):
    last = {"val_loss": 2.0, "step": 8, "tokens": 1234}
    result = outcome("stopped", -signal.SIGTERM, tmp_path, last)
    assert result.status == Status.PRUNED and result.steps == 8
    assert result.train_tokens == 1234  # what the pruned trial cost


def _study():
    study = optuna.create_study(directions=["maximize", "minimize"])
    study.set_user_attr("metric", "accuracy")
    return study


def test_out_of_memory_is_a_violated_constraint_not_a_failure():
    study = _study()
    trial = study.ask()
    result = TrialResult(Status.INFEASIBLE, error="oom: CUDA out of memory", peak_memory_gib=23.9)
    assert tell(trial, result, budget_gib=24.0).name == "COMPLETE"
    (frozen,) = study.trials
    assert frozen.values == [0.0, 23.9] and frozen.constraints["vram_budget_gb"] >= 1.0
    assert frozen.user_attrs["reason"] == "oom"


def test_budget_decides_feasibility_of_a_finished_trial():
    study = _study()
    for peak in (20.0, 30.0):
        trial = study.ask()
        tell(trial, TrialResult(Status.SUCCESS, {"accuracy": 0.9}, peak_memory_gib=peak), 24.0)
    fits, over = study.trials
    assert (
        fits.constraints["vram_budget_gb"] == -4.0
        and "reason" not in fits.user_attrs
        or (fits.user_attrs["reason"] == "")
    )
    assert over.constraints["vram_budget_gb"] == 6.0 and over.user_attrs["reason"] == "over_budget"
    # the constrained Pareto front leaves the infeasible trial out
    assert [t.number for t in study.best_trials] == [0]


def test_oom_kill_counter_is_read_from_cgroup_files(tmp_path):
    v1 = tmp_path / "memory.oom_control"
    v1.write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 3\n")
    assert trial_process.oom_kills((tmp_path / "absent", v1)) == 3
    assert trial_process.oom_kills((tmp_path / "absent",)) is None


def test_watch_passes_the_running_gpu_peak_to_placement():
    class Tracker:
        def log_event(self, run_id, event):
            pass

    seen = []
    watch = Watch(Tracker(), "run", mirror=None, on_memory=seen.append)
    assert watch({"event": "train", "step": 1, "loss": 2.0, "tokens": 64, "gpu_gib": 5.5}) is False
    assert watch({"event": "train", "step": 2, "loss": 1.9, "tokens": 128}) is False  # CPU trial
    assert seen == [5.5] and watch.last == {"tokens": 128}


def test_a_failed_save_keeps_the_measured_metric():
    study = optuna.create_study(directions=["maximize", "minimize"])
    trial = study.ask()
    error = "adapter not saved: [Errno 28] No space left on device"
    result = TrialResult(Status.FAILED, metrics={"accuracy": 0.75}, error=error)
    assert tell(trial, result, 24.0) == optuna.trial.TrialState.FAIL
    attrs = study.trials[0].user_attrs
    assert attrs["reason"] == "adapter not saved" and attrs["metrics"] == {"accuracy": 0.75}


class _Tracker:
    """MLflow's side of a trial: fails while `broken` (the artifact store is gone)."""

    def __init__(self):
        self.broken, self.finished = True, []

    def finish_trial(self, run_id, result, trial_dir, state):
        if self.broken:
            raise OSError(2, "No such file or directory", "storage/mlartifacts/1/abc")
        self.finished.append((run_id, result.status, state))


def test_an_mlflow_failure_is_said_recorded_and_uploaded_by_the_next_run(tmp_path, capsys):
    from sweep.trial import finish_mlflow, upload_pending

    study = optuna.create_study(directions=["maximize", "minimize"])
    TrialResult(Status.SUCCESS, metrics={"accuracy": 0.8}).save(tmp_path / "result.json")
    tracker = _Tracker()
    result = TrialResult.load(tmp_path / "result.json")
    assert not finish_mlflow(tracker, study, 3, "run-3", tmp_path, "FINISHED", result)
    said = capsys.readouterr().out.strip().splitlines()
    assert len(said) == 1 and "trial 3: MLflow upload failed" in said[0]
    assert study.user_attrs["mlflow_pending:3"]["run_id"] == "run-3"
    tracker.broken = False  # the store is back: the next sweep run uploads what is missing
    upload_pending(study, tracker)
    assert tracker.finished == [("run-3", Status.SUCCESS, "FINISHED")]
    assert study.user_attrs["mlflow_pending:3"] is None
    upload_pending(study, tracker)  # nothing left: no second upload
    assert len(tracker.finished) == 1


OOM = "oom: OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"


@pytest.mark.parametrize(
    "error, gpu, shared, reason, again",
    [
        (OOM, 0, True, "", True),  # the card may have run out: run it again
        (OOM, 0, False, "", False),  # alone on its card: its own OOM, infeasible
        (OOM, None, False, "", False),  # not on a GPU
        (OOM, 0, True, "oom_shared", False),  # a retry of a shared OOM: infeasible now
        ("oom: killed by the kernel's OOM killer", 0, True, "", False),  # host memory
    ],
)
def test_an_out_of_memory_on_a_shared_card_is_run_again(error, gpu, shared, reason, again):
    from sweep.placement import Slot
    from sweep.trial import shared_oom

    slot = Slot(gpu, 0.0, ("m", "qlora"), shared=shared)
    result = TrialResult(Status.INFEASIBLE, error=error, peak_memory_gib=7.5)
    trial = optuna.create_study().ask()
    if reason:
        trial.set_user_attr("reason", reason)
    said = shared_oom(result, slot, trial, retries=1)
    assert bool(said) == again
    assert not said or said.startswith("oom_shared: out of GPU memory while other trials shared")


def test_a_shared_oom_is_queued_again_and_its_retry_stored_as_measured(
    tmp_path, monkeypatch, tiny_model, shared_data, capsys
):
    """run_one with the trial process replaced by one that runs out of GPU memory: on a card
    it shared, the trial fails (`oom_shared`) and its parameters are queued again; the retry,
    out of memory again, is infeasible with its peak, as a trial alone would be."""
    from sweep import config, trial
    from sweep.placement import Slot
    from tests.conftest import write_config

    cfg = config.load(write_config(tmp_path, tiny_model, shared_data), study="tiny")
    study_cfg = cfg.studies["tiny"]
    oom = TrialResult(Status.INFEASIBLE, error=OOM, peak_memory_gib=7.5, memory_kind="cuda_process")
    monkeypatch.setattr(
        trial_process, "launch", lambda *a, **k: type("W", (), {"returncode": 0, "proc": None})()
    )
    monkeypatch.setattr(trial_process, "follow", lambda *a, **k: "exited")
    monkeypatch.setattr(trial_process, "release", lambda *a, **k: None)
    monkeypatch.setattr(trial, "outcome", lambda *a, **k: oom)

    class Tracker:
        def start_trial(self, number, params, tags):
            return f"run-{number}"

        def finish_trial(self, run_id, result, trial_dir, state):
            pass

    storage = f"sqlite:///{tmp_path}/o.db"
    study = optuna.create_study(
        storage=storage, study_name="tiny", directions=["maximize", "minimize"]
    )
    study.set_user_attr("metric", "accuracy")
    companion = optuna.create_study(storage=storage, study_name="tiny--val-loss")
    params = {"model": "tiny", "r": 8, "alpha_multiple": 2.0, "lr": 3e-4}
    stored = []
    for _ in range(2):
        asked = trial.ask(study)
        for name, value in params.items():
            asked.suggest_categorical(name, [value])
        slot = Slot(0, 0.0, ("tiny", "qlora"), shared=True)
        state, _ = trial.run_one(cfg, study_cfg, asked, params, companion, Tracker(), slot,
                                 on_stored=stored.append)  # fmt: skip
    first, retry = study.trials
    assert first.state.name == "FAIL" and first.user_attrs["reason"] == "oom_shared"
    assert "queued again" in capsys.readouterr().out
    assert retry.params == first.params and retry.system_attrs["failed_trial"] == first.number
    assert retry.state.name == "COMPLETE" and retry.values == [0.0, 7.5]
    assert retry.constraints["vram_budget_gb"] >= 1.0 and retry.user_attrs["reason"] == "oom"
    assert stored[0].error.startswith("oom_shared") and stored[1].status == Status.INFEASIBLE
