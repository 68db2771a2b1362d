"""report, best, export, dashboard and ui on a real (tiny) study: files, HTTP, bad input."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pytest

from tests.conftest import ROOT, _pythonpath, run_cli, write_config


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory, tiny_model, shared_data) -> Path:
    """Three trials of the tiny study, one of them pruned by a threshold on its loss."""
    folder = tmp_path_factory.mktemp("report")
    cfg = write_config(folder, tiny_model, shared_data)
    out = run_cli("run", "--study", "tiny", "--config", str(cfg), "--n-trials", "2")
    assert out.returncode == 0, out.stderr[-3000:]
    prune = ['pruner={name="ThresholdPruner", upper=0.0}']
    out = run_cli(
        "run", "--study", "tiny", "--config", str(cfg), "--n-trials", "1", "--set", *prune
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return folder


def _cli(folder: Path, *args: str):
    return run_cli(*args, "--config", str(folder / "sweep.toml"))


def test_report_writes_every_figure_and_logs_them_to_mlflow(study_dir):
    out = _cli(study_dir, "report", "--study", "tiny", "--examples", "2", "--max-new-tokens", "4")
    assert out.returncode == 0, out.stderr[-3000:]
    folder = study_dir / "storage" / "reports" / "tiny"
    md = (folder / "report.md").read_text()
    for name in (
        "pareto",
        "rank",
        "learning-rate",
        "scaling",
        "curves-best",
        "tokens",
        "throughput",
        "timeline",
    ):
        png = (folder / f"{name}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000, name
        assert f"({name}.png)" in md and (folder / f"{name}.html").stat().st_size > 500
    assert (folder / "plotly.min.js").stat().st_size > 1_000_000  # interactive offline
    assert "3 trials: 2 complete, 0 infeasible, 1 pruned, 0 failed" in md
    assert "needs 4 complete trials" in md  # importances are not made up from 2 trials
    examples = json.loads((folder / "examples.json").read_text())
    assert len(examples["prompts"]) == 2 and len(examples["answers"]) == 2
    assert "tiny" in examples["base"] and "| prompt | reference | base tiny |" in md
    html = (folder / "report.html").read_text()
    assert "<img src='pareto.png'" in html and "<table>" in html
    logged = list((study_dir / "storage" / "mlartifacts").rglob("report/pareto.png"))
    assert len(logged) == 1  # in the study's parent run


def test_best_lists_the_pareto_front(study_dir):
    out = _cli(study_dir, "best", "--study", "tiny")
    assert out.returncode == 0, out.stderr[-3000:]
    study = optuna.load_study(study_name="tiny", storage=_url(study_dir))
    for trial in study.best_trials:
        assert f"│ {trial.number} │" in out.stdout
    assert "1 pruned" in out.stdout and "training tokens" in out.stdout


def test_export_gives_a_loadable_adapter(study_dir, tiny_model, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = _cli(study_dir, "export", "--study", "tiny", "--trial", "0", "--out", str(tmp_path / "a"))
    assert out.returncode == 0, out.stderr[-3000:]
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model), tmp_path / "a"
    )
    assert model.peft_config["default"].r in (4, 8)
    summary = json.loads((tmp_path / "a" / "sweep-trial.json").read_text())
    assert summary["trial"] == 0 and "accuracy" in summary["values"]
    assert (tmp_path / "a" / "sweep-config.json").is_file()


def test_bad_input_is_one_line_and_exit_2(study_dir, tmp_path):
    optuna.create_study(study_name="empty", storage=_url(study_dir))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    cases = [
        ("report", "--study", "nope"),
        ("best", "--study", "empty"),
        ("report", "--study", "empty", "--out", str(tmp_path / "r")),
        ("export", "--study", "tiny", "--trial", "7", "--out", str(tmp_path / "e")),
        ("export", "--study", "tiny", "--trial", "2", "--out", str(tmp_path / "p")),  # pruned
        ("export", "--study", "tiny", "--trial", "0", "--out", str(tmp_path / "full")),
        ("export", "--study", "tiny", "--trial", "0", "--out", "/proc/sweep-export"),
        ("report", "--study", "tiny", "--out", "/proc/sweep-report"),
    ]
    for args in cases:
        out = _cli(study_dir, *args)
        assert out.returncode == 2, (args, out.stderr[-2000:])
        assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr, args
    assert (tmp_path / "full" / "x").read_text() == "keep me"


def test_dashboard_serves_the_study_over_http(study_dir):
    port = _free_port()
    proc = _serve(study_dir, "dashboard", "--study", "tiny", "--port", str(port))
    try:
        studies = _get_json(f"http://127.0.0.1:{port}/api/studies", proc)["study_summaries"]
        study_id = next(s["study_id"] for s in studies if s["study_name"] == "tiny")
        detail = _get_json(f"http://127.0.0.1:{port}/api/studies/{study_id}?after=0", proc)
        assert len(detail["trials"]) == 3
    finally:
        _stop(proc)
    assert proc.returncode == 0
    with pytest.raises(OSError):  # its server went with it
        socket.create_connection(("127.0.0.1", port), timeout=2)


def test_ui_serves_the_mlflow_runs_over_http(study_dir):
    port = _free_port()
    proc = _serve(study_dir, "ui", "--port", str(port))
    try:
        url = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=10"
        found = _get_json(url, proc, timeout=90)
        assert "tiny" in {e["name"] for e in found["experiments"]}
    finally:
        _stop(proc)
    assert proc.returncode == 0
    with pytest.raises(OSError):  # its server workers went with it
        socket.create_connection(("127.0.0.1", port), timeout=2)


def test_a_busy_port_is_one_line_and_exit_2(study_dir):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        out = _cli(study_dir, "dashboard", "--port", str(busy.getsockname()[1]))
    assert out.returncode == 2 and "cannot listen on 127.0.0.1" in out.stderr


def _url(folder: Path) -> str:
    return f"sqlite:///{folder}/storage/optuna.db"


def _serve(folder: Path, *args: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "sweep", *args, "--config", str(folder / "sweep.toml")]
    env = {**os.environ, "PYTHONPATH": _pythonpath()}
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )


def _get_json(url: str, proc: subprocess.Popen, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, proc.stdout.read()
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return json.loads(response.read())
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)  # Ctrl-C
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
