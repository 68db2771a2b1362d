"""report, best, export, dashboard and ui on a real (tiny) study: files, HTTP, bad input."""

from __future__ import annotations

import json
import os
import shutil
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


# --- what a person sees: the pages in headless Chromium (Debian's, driven by Playwright) ---


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Chromium is not installed (apt-get install chromium; .ci/run does)"
    with sync_playwright() as p:
        launched = p.chromium.launch(
            executable_path=chromium, args=["--no-sandbox", "--disable-gpu"]
        )
        yield launched
        launched.close()


def _page(browser, errors: list):
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.on("pageerror", lambda err: errors.append(str(err)))
    page.on("console", lambda msg: msg.type == "error" and errors.append(msg.text))
    return page


@pytest.mark.browser
def test_report_in_a_browser(study_dir, browser):
    """Every image of report.html loads; every interactive page draws its plot; no errors."""
    folder = study_dir / "storage" / "reports" / "tiny"
    if not (folder / "report.html").exists():
        out = _cli(study_dir, "report", "--study", "tiny", "--examples", "0")
        assert out.returncode == 0, out.stderr[-3000:]
    errors: list = []
    page = _page(browser, errors)
    page.goto((folder / "report.html").as_uri())
    page.wait_for_load_state("load")
    images = page.eval_on_selector_all(
        "img", "els => els.map(e => [e.getAttribute('src'), e.complete && e.naturalWidth])"
    )
    assert len(images) >= 8 and all(width > 100 for _, width in images), images
    page.screenshot(path=str(study_dir / "report-browser.png"))
    for html in sorted(folder.glob("*.html")):
        if html.name == "report.html":
            continue
        page.goto(html.as_uri())
        page.wait_for_selector(".js-plotly-plot .main-svg", timeout=30_000)
    assert errors == []


@pytest.mark.browser
def test_dashboard_in_a_browser(study_dir, browser):
    """optuna-dashboard: the study page draws the Pareto front; the trials page lists all."""
    port = _free_port()
    proc = _serve(study_dir, "dashboard", "--study", "tiny", "--port", str(port))
    errors: list = []
    try:
        studies = _get_json(f"http://127.0.0.1:{port}/api/studies", proc)["study_summaries"]
        study_id = next(s["study_id"] for s in studies if s["study_name"] == "tiny")
        page = _page(browser, errors)
        page.goto(f"http://127.0.0.1:{port}/dashboard/studies/{study_id}")
        page.get_by_text("Pareto Front").first.wait_for(timeout=60_000)
        page.wait_for_selector(".js-plotly-plot .main-svg", timeout=60_000)
        page.screenshot(path=str(study_dir / "dashboard-browser.png"))
        page.goto(f"http://127.0.0.1:{port}/dashboard/studies/{study_id}/trials")
        for n in range(3):
            page.get_by_text(f"Trial {n}", exact=False).first.wait_for(timeout=60_000)
        page.screenshot(path=str(study_dir / "dashboard-trials-browser.png"))
    finally:
        _stop(proc)
    assert errors == []


@pytest.mark.browser
def test_mlflow_ui_in_a_browser(study_dir, browser):
    """The MLflow UI's runs page of the study's experiment lists the study's runs."""
    port = _free_port()
    proc = _serve(study_dir, "ui", "--port", str(port))
    try:
        url = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=10"
        found = _get_json(url, proc, timeout=90)
        experiment = next(e for e in found["experiments"] if e["name"] == "tiny")
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/2.0/mlflow/runs/search",
            data=json.dumps({"experiment_ids": [experiment["experiment_id"]]}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            runs = json.loads(response.read())["runs"]
        names = {r["info"]["run_name"] for r in runs}
        assert {"tiny", "trial-0", "trial-1", "trial-2"} <= names
        page = _page(browser, [])
        page.goto(f"http://127.0.0.1:{port}/#/experiments/{experiment['experiment_id']}/runs")
        page.get_by_text(f"{len(runs)} matching runs").first.wait_for(timeout=90_000)
        page.get_by_text("tiny", exact=True).first.wait_for(timeout=30_000)
        page.screenshot(path=str(study_dir / "mlflow-browser.png"))
    finally:
        _stop(proc)
