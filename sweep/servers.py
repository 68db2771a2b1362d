"""`sweep dashboard` (optuna-dashboard on the study storage) and `sweep ui` (the MLflow UI on
the tracking store). Both bind 127.0.0.1 unless told otherwise, print the URL, and stop on
Ctrl-C. Both only read while a sweep writes: the SQLite files are in WAL mode (sweep/checks.py),
so readers never hold the lock a writer waits for (optuna-dashboard issue #545).

Each server runs as a child process group started from the projects' own CLIs, so Ctrl-C (or
`kill`) stops it and every worker it started, at once.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from sweep.errors import ConfigError


def dashboard(storage_url: str, host: str, port: int, study_id: int | None) -> None:
    storage = (
        ["--storage-class", "JournalFileStorage"] if storage_url.startswith("journal:") else []
    )
    cmd = [
        sys.executable,
        "-c",
        "from optuna_dashboard._cli import main; main()",
        storage_url.removeprefix("journal:"),
        *storage,
        "--host",
        host,
        "--port",
        str(port),
    ]
    url = f"http://{host}:{port}/dashboard/" + (f"studies/{study_id}" if study_id else "")
    serve("optuna-dashboard", cmd, host, port, url)


def ui(tracking_uri: str, artifacts: Path, host: str, port: int) -> None:
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        tracking_uri,
        "--default-artifact-root",
        artifacts.as_uri(),
        "--host",
        host,
        "--port",
        str(port),
    ]
    serve("MLflow UI", cmd, host, port, f"http://{host}:{port}")


def serve(name: str, cmd: list[str], host: str, port: int, url: str) -> None:
    check_port(host, port)
    for sig in (signal.SIGINT, signal.SIGTERM):  # also when started with SIGINT ignored
        signal.signal(sig, _interrupt)
    proc = subprocess.Popen(cmd, start_new_session=True)
    print(f"{name}: {url}  (Ctrl-C stops it)", flush=True)
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        _stop_group(proc)
        print(f"{name} stopped")
        return
    if code != 0:
        raise ConfigError(f"{name} exited with status {code} (its output is above)")


def check_port(host: str, port: int) -> None:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError as err:
            raise ConfigError(f"cannot listen on {host}:{port}: {err.strerror}", "--port") from None


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _stop_group(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
