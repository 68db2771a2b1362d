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
