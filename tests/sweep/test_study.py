"""Real sweeps on a tiny random Qwen2 with real SST-2 rows: each trial is a child process."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import time

import psutil

from tests.conftest import (
    parked_worker,
    run_cli,
    start_sweep,
    study_folder,
    study_trials,
    trial_folder,
    write_config,
)


def test_two_trial_sweep_then_resume(tmp_path, tiny_model, shared_data):
    cfg = write_config(tmp_path, tiny_model, shared_data)
    first = run_cli("run", "--study", "tiny", "--config", str(cfg))
    assert first.returncode == 0, first.stderr[-3000:]
    trials = study_trials(tmp_path)
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    for t in trials:
        accuracy, peak = t.values
        assert 0.0 <= accuracy <= 1.0 and peak > 0
        assert t.user_attrs["memory_kind"] == "cpu_rss"
        assert t.user_attrs["train_tokens_per_s"] > 0 and t.user_attrs["steps"] == 4
        trial_dir = trial_folder(tmp_path, t.number)
        assert (trial_dir / "adapter" / "adapter_model.safetensors").is_file()
        result = json.loads((trial_dir / "result.json").read_text())
        assert result["status"] == "success" and result["versions"]["torch"]
        assert json.loads((trial_dir / "config.json").read_text())["params"]["r"] == t.params["r"]

    # MLflow: one parent run, one child run per trial with curves and the adapter
    db = sqlite3.connect(tmp_path / "storage" / "mlflow.db")
    runs = dict(db.execute("select name, run_uuid from runs").fetchall())
    assert set(runs) == {"tiny", "trial-0", "trial-1"}
    steps = db.execute(
        "select count(*) from metrics where key='train_loss' and run_uuid=?", (runs["trial-0"],)
    ).fetchone()[0]
    assert steps == 4
    assert list((tmp_path / "storage" / "mlartifacts").rglob("adapter_model.safetensors"))

    second = run_cli("run", "--study", "tiny", "--config", str(cfg), "--n-trials", "1")
    assert second.returncode == 0, second.stderr[-3000:]
    after = study_trials(tmp_path)
    assert len(after) == 3 and [t.values for t in after[:2]] == [t.values for t in trials]
    # the seeded sampler, made anew, did not draw trial 0's configuration again
    assert after[2].params["lr"] not in {t.params["lr"] for t in trials}

    status = run_cli("status", "--study", "tiny", "--config", str(cfg))
    assert status.returncode == 0 and status.stdout.count("complete") == 3

    # the learning-curve table of these trials (sweep/curves.py; `sweep replay` reads it)
    table = tmp_path / "curves.json"
    made = run_cli(
        "curves", "--study", "tiny", "--config", str(cfg), "--alone", "0", "--out", str(table)
    )
    assert made.returncode == 0, made.stderr[-2000:]
    data = json.loads(table.read_text())
    assert len(data["runs"]) == 3 and data["train"]["max_steps"] == 4
    assert data["cost"]["tokens_per_s"] > 0 and data["cost"]["from_trials"] == [0]
    assert [len(r["tokens"]) for r in data["runs"]] == [4, 4, 4]
    # extended with the same storage: every run is there already (sweep curves --extend)
    extended = tmp_path / "curves2.json"
    made = run_cli("curves", "--study", "tiny", "--config", str(cfg), "--extend", str(table),
                   "--out", str(extended))  # fmt: skip
    assert made.returncode == 0, made.stderr[-2000:]
    assert json.loads(extended.read_text())["runs"] == data["runs"]


def test_pruned_trial_stops_early(tmp_path, tiny_model, shared_data):
    # ThresholdPruner(upper=0) prunes at the first validation loss, deterministically
    cfg = write_config(
        tmp_path,
        tiny_model,
        shared_data,
        extra='pruner = { name = "ThresholdPruner", upper = 0.0 }',
    )
    out = run_cli(
        "run",
        "--study",
        "tiny",
        "--config",
        str(cfg),
        "--n-trials",
        "1",
        "--set",
        "train.max_steps=40",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    (trial,) = study_trials(tmp_path)
    assert trial.state.name == "PRUNED"
    assert trial.user_attrs["last_val_loss"] > 0 and trial.user_attrs["steps"] == 2
    mirror = study_trials(tmp_path, "tiny--val-loss")[0]
    assert mirror.state.name == "PRUNED" and list(mirror.intermediate_values) == [2]
    assert not (trial_folder(tmp_path, 0) / "result.json").exists()


def _endless_sweep(tmp_path, tiny_model, shared_data) -> tuple[subprocess.Popen, object]:
    """A sweep whose first trial trains until stopped; returns it and that trial's spec path."""
    sweep = start_sweep(write_config(tmp_path, tiny_model, shared_data), "train.max_steps=100000")
    return sweep, trial_folder(tmp_path, 0) / "spec.json"


def _trial_processes(sweep: subprocess.Popen, count: int = 2, wait_s: float = 60) -> list:
    """The sweep's trial processes once `count` of them exist (the running trial and a spare
    started ahead: warm workers and spares must die with the sweep too)."""
    deadline = time.monotonic() + wait_s
    while True:
        children = [c for c in psutil.Process(sweep.pid).children(recursive=True)
                    if "src.train_qlora" in " ".join(c.cmdline())]  # fmt: skip
        if len(children) >= count or time.monotonic() > deadline:
            assert children
            return children
        time.sleep(0.5)


def test_ctrl_c_stops_the_trial_process(tmp_path, tiny_model, shared_data):
    sweep, spec = _endless_sweep(tmp_path, tiny_model, shared_data)
    log = spec.parent / "stdout.log"
    try:
        deadline = time.monotonic() + 120
        while not (log.exists() and "SWEEP_PROGRESS" in log.read_text()):
            assert time.monotonic() < deadline and sweep.poll() is None, sweep.stderr.read()
            time.sleep(0.5)
        children = _trial_processes(sweep)  # the trial's and the spare's
        sweep.send_signal(signal.SIGINT)
        _, err = sweep.communicate(timeout=60)
    finally:  # a failing test must not leave a sweep or a trial training forever
        sweep.kill()
        subprocess.run(["pkill", "-9", "-f", str(spec)])
    assert sweep.returncode == 130 and err.strip().splitlines()[-1].startswith("interrupted")
    alive = subprocess.run(["pgrep", "-f", str(spec)], capture_output=True, text=True).stdout
    assert alive == ""
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    assert [t.state.name for t in study_trials(tmp_path)] == ["FAIL"]


def test_killed_sweep_leaves_no_trial_process(tmp_path, tiny_model, shared_data):
    sweep, spec = _endless_sweep(tmp_path, tiny_model, shared_data)
    try:
        deadline = time.monotonic() + 120
        while subprocess.run(["pgrep", "-f", str(spec)], capture_output=True).returncode != 0:
            assert time.monotonic() < deadline and sweep.poll() is None
            time.sleep(0.5)
        children = _trial_processes(sweep)  # the trial's and the spare's
        sweep.kill()  # SIGKILL: no handler of ours runs
        sweep.wait()
        time.sleep(1)
        alive = subprocess.run(["pgrep", "-f", str(spec)], capture_output=True, text=True).stdout
        assert alive == ""
        assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    finally:
        subprocess.run(["pkill", "-9", "-f", str(spec)])


def _task_config(tmp_path, tiny_model, shared_data, task: str, eval_table: str):
    cfg = write_config(tmp_path, tiny_model, shared_data)
    text = cfg.read_text().replace('task = "sst2"', f'task = "{task}"')
    text = text.replace("eval = { max_examples = 16, batch_size = 16 }", f"eval = {eval_table}")
    cfg.write_text(text.replace("max_seq_len = 64", "max_seq_len = 256"))
    return cfg


def test_squad_study_scores_generated_answers(tmp_path, tiny_model, shared_data):
    cfg = _task_config(
        tmp_path, tiny_model, shared_data, "squad", "{ max_examples = 8, max_new_tokens = 4 }"
    )
    out = run_cli("run", "--study", "tiny", "--config", str(cfg), "--n-trials", "1")
    assert out.returncode == 0, out.stderr[-3000:]
    (trial,) = study_trials(tmp_path)
    metrics = trial.user_attrs["metrics"]
    assert trial.state.name == "COMPLETE" and trial.values[0] == metrics["f1"]
    assert 0 <= metrics["exact_match"] <= metrics["f1"] <= 100
    preds = json.loads((trial_folder(tmp_path, 0) / "predictions.json").read_text())
    assert len(preds) == 8  # official format {question_id: answer}, re-scorable by `score`
    status = run_cli("status", "--study", "tiny", "--config", str(cfg))
    assert "split by article" in status.stdout  # nobody mistakes it for the official dev F1
    db = sqlite3.connect(tmp_path / "storage" / "mlflow.db")
    (eval_set,) = db.execute("select value from tags where key='eval_set'").fetchone()
    assert "not the official dev score" in eval_set
    # the adapter was saved before evaluation began; the two peaks are measured apart
    log = (trial_folder(tmp_path, 0) / "stdout.log").read_text()
    lines = [line for line in log.splitlines() if line.startswith("SWEEP_PROGRESS ")]
    events = [json.loads(line.split(" ", 1)[1])["event"] for line in lines]
    assert events.index("saved") < events.index("evaluating")
    result = json.loads((trial_folder(tmp_path, 0) / "result.json").read_text())
    assert result["peak_memory_gib"] > 0 and result["eval_peak_memory_gib"] > 0
    assert trial.values[1] == result["peak_memory_gib"]  # the objective: training's peak
    assert trial.user_attrs["eval_peak_memory_gib"] == result["eval_peak_memory_gib"]
    assert result["generation"]["tokens"] > 0  # `generate` on the CPU, the fast path on CUDA
    assert {"load", "training", "validation", "generation", "saving"} <= set(result["phases"])


def test_alpacaeval_study_falls_back_to_val_loss_without_a_judge(tmp_path, tiny_model, shared_data):
    judge = '{ name = "openai", model = "gpt-4-1106-preview", api_key_env = "SWEEP_NO_KEY" }'
    cfg = _task_config(
        tmp_path,
        tiny_model,
        shared_data,
        "alpacaeval",
        f"{{ max_examples = 4, max_new_tokens = 4, judge = {judge} }}",
    )
    out = run_cli("run", "--study", "tiny", "--config", str(cfg), "--n-trials", "1")
    assert out.returncode == 0, out.stderr[-3000:]
    (trial,) = study_trials(tmp_path)
    assert trial.state.name == "COMPLETE"
    assert trial.values[0] == -trial.user_attrs["last_val_loss"]
    assert "SWEEP_NO_KEY is not set" in trial.user_attrs["objective_fallback"]
    outputs = json.loads((trial_folder(tmp_path, 0) / "model_outputs.json").read_text())
    assert len(outputs) == 4 and set(outputs[0]) == {
        "instruction",
        "output",
        "generator",
        "dataset",
    }
    status = run_cli("status", "--study", "tiny", "--config", str(cfg))
    assert "judge unreachable" in status.stdout


def test_alpacaeval_study_with_the_local_judge(tmp_path, tiny_model, shared_data):
    cfg = _task_config(
        tmp_path,
        tiny_model,
        shared_data,
        "alpacaeval",
        '{ max_examples = 10, max_new_tokens = 4, judge = { name = "local" } }',
    )
    out = run_cli("run", "--study", "tiny", "--config", str(cfg), "--n-trials", "1")
    assert out.returncode == 0, out.stderr[-3000:]
    (trial,) = study_trials(tmp_path)
    metrics = trial.user_attrs["metrics"]
    assert trial.values[0] == metrics["win_rate"] and 0 <= metrics["win_rate"] <= 100
    assert metrics["n_total"] == 10 and "length_controlled_winrate" in metrics
    annotations = json.loads((trial_folder(tmp_path, 0) / "annotations.json").read_text())
    assert {a["generator_1"] for a in annotations} == {"gpt4_1106_preview"}
    assert all(1 <= a["preference"] <= 2 for a in annotations)


def test_methods_grid_trains_lora_and_full_fine_tuning(tmp_path, tiny_model, shared_data):
    cfg = write_config(tmp_path, tiny_model, shared_data)
    grid = ['space.method=["lora", "full"]', 'sampler={name="GridSampler"}', "space.r=[4]",
            "space.lr=5e-4", "space.lr_full=5e-5", "space.dropout=0.0", "n_trials=5"]  # fmt: skip
    out = run_cli("run", "--study", "tiny", "--config", str(cfg), *_sets(grid))
    assert out.returncode == 0, out.stderr[-3000:]
    trials = study_trials(tmp_path)
    assert len(trials) == 2  # the grid's two points, though n_trials is 5
    by_method = {t.params["method"]: t for t in trials}
    assert set(by_method) == {"lora", "full"}
    assert all(t.state.name == "COMPLETE" for t in trials)
    assert by_method["full"].user_attrs["trainable_pct"] == 100.0
    assert by_method["lora"].user_attrs["trainable_pct"] < 50
    folder = study_folder(tmp_path)
    full, lora = by_method["full"].number, by_method["lora"].number
    assert (folder / str(full) / "model" / "model.safetensors").is_file()
    assert (folder / str(lora) / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((folder / str(full) / "spec.json").read_text())["params"]["lr"] == 5e-5


def _sets(items: list[str]) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def test_spares_cover_the_first_wave_then_one_beside_warm_workers():
    """Processes started ahead: one per trial the card may still take while the first wave
    waits for its peaks to be known; once it is full, one beside warm workers, or as many as
    may start together (at most MAX_SPARES) when each trial gets a fresh process."""
    from sweep.study import MAX_SPARES, spares_ahead

    assert spares_ahead(left=31, limit=16, open_slots=11, warm=True) == 11
    assert spares_ahead(left=31, limit=16, open_slots=0, warm=True) == 1
    assert spares_ahead(left=31, limit=16, open_slots=0, warm=False) == MAX_SPARES
    assert spares_ahead(left=31, limit=16, open_slots=11, warm=False) == 11
    assert spares_ahead(left=2, limit=16, open_slots=11, warm=True) == 2  # no more trials
    assert spares_ahead(left=0, limit=1, open_slots=0, warm=False) == 0
    assert spares_ahead(left=5, limit=1, open_slots=0, warm=False) == 1  # one at a time
    assert spares_ahead(left=31, limit=16, open_slots=11, warm=True, room=6) == 6  # host memory


def test_spares_a_known_peak_leaves_no_room_for_end(monkeypatch):
    """A 7B study packed on a 24 GiB card: the first launch starts a spare per core, but once
    the first trial's peak is known only one trial fits, so all spares but one end."""
    from sweep import placement as placement_mod
    from sweep import trial_process
    from sweep.study import trim_spares

    monkeypatch.setattr(placement_mod, "card_memory", lambda index: (24.0, 0.5))
    p = placement_mod.Placement([0], None, 1, budget_gib=24.0, learned={}, cores=16)
    key = ("qwen2.5-7b", "qlora")
    running = p.take(key)
    pool, env = trial_process.Pool(), p.slot_env(0)
    procs = [subprocess.Popen(["sleep", "60"], start_new_session=True) for _ in range(6)]
    for proc in procs:
        parked_worker(pool.waiting, proc, env)
    assert trim_spares(p, left=10, warm=True, key=key, pool=pool) == 0  # peak unknown: kept
    p.observe(running, 14.0)
    assert trim_spares(p, left=10, warm=True, key=key, pool=pool) == 5  # one stays
    assert all(proc.wait(timeout=30) is not None for proc in procs[1:])
    procs[0].kill()
    procs[0].wait()


def test_a_sweep_never_fails_its_own_running_trials_as_stale(tmp_path):
    """The staleness check fails RUNNING trials whose heartbeat is older than the grace, the
    owner check those whose owner's process is gone: not the ones this process runs, whose
    beats can lag on a loaded host and whose recorded start time a clock step can contradict
    (CI: a `--jobs 2` sweep failed its own trial 0, then crashed storing its result); another
    owner's still go."""
    import optuna

    from sweep import checks
    from sweep import study as sweep_study
    from sweep.trial import Heartbeat, ask

    storage = checks.make_storage(f"sqlite:///{tmp_path}/o.db", heartbeat_s=1, retries=0)
    study = optuna.create_study(storage=storage, study_name="s", direction="maximize")
    companion = optuna.create_study(storage=storage, study_name="s--val-loss")
    ours, foreign = ask(study), ask(study)
    # psutil's start time of this process as a clock step can make it look: another process
    ours.set_user_attr("owner", ours.user_attrs["owner"] | {"started": 0.0})
    foreign.set_user_attr("owner", {"host": "elsewhere", "pid": 1, "started": 0.0})
    mirror = ask(companion)
    mirror.set_user_attr("trial_number", ours.number)
    Heartbeat(storage, [ours._trial_id, foreign._trial_id, mirror._trial_id])()
    time.sleep(3.2)  # > the 2 s grace (SQLite's clock counts whole seconds)

    class Tracker:
        failed: list = []

        def fail_run(self, run_id, why):
            self.failed.append(run_id)

    sweep_study.fail_orphans(study, companion, Tracker())
    states = {t.number: t.state.name for t in study.get_trials()}
    assert states == {ours.number: "RUNNING", foreign.number: "FAIL"}
    assert companion.get_trials()[0].state.name == "RUNNING"


def test_the_retries_of_shared_card_ooms_run_in_the_same_sweep(tmp_path, monkeypatch):
    """A trial queued again after running out of memory on a shared card (sweep/trial.py
    `shared_oom`) is replaced by its retry: `--n-trials 3` with two such trials runs five."""
    import optuna

    from sweep import config
    from sweep import study as sweep_study
    from sweep.placement import Placement

    cfg = config.load(write_config(tmp_path, tmp_path, tmp_path), study="tiny")
    study = optuna.create_study(directions=["maximize", "minimize"])
    companion = optuna.create_study()
    ran = []

    def run_and_report(cfg, study_cfg, trial, params, companion, tracker, placement, slot,
                       spares, retried):  # fmt: skip
        time.sleep(0.3)
        ran.append(trial.number)
        placement.give(slot, None, False)
        if trial.number in (0, 2):  # as run_one does: failed, queued again
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            study.enqueue_trial(trial.params)
            retried.append(trial.number)
        else:
            study.tell(trial, [0.5, 1.0])

    monkeypatch.setattr(sweep_study, "run_and_report", run_and_report)
    placement = Placement(None, None, 2, budget_gib=0.0, learned={})
    workers = sweep_study.Workers()
    sweep_study.launch_trials(cfg, cfg.studies["tiny"], study, companion, None, placement,
                              workers, 3, None)  # fmt: skip
    workers.join()
    assert sorted(ran) == [0, 1, 2, 3, 4]
    states = [t.state.name for t in study.trials]
    assert states.count("FAIL") == 2 and states.count("COMPLETE") == 3
