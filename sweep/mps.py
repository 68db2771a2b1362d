"""CUDA MPS (Multi-Process Service) for trials packed onto a GPU (`--trials-per-gpu`).

Without it the GPU time-slices between the trial processes' contexts: one process's kernels
at a time. A small trial launches short kernels, so most of each slice is idle; through an
MPS server the kernels of all the trials on a card run side by side. Measured on the H200
(docs/bench/README.md, issue 7): 32 packed 0.5B SST-2 trials, 16 at once, 755 trials/h
without MPS, 1,085-1,309 with; a packed trial trained in 11.7 s instead of 31.7 s.

The sweep starts a daemon of its own (its pipe and log folders in a fresh temporary folder,
so it never touches a system-wide one) and stops it when the sweep ends. Nothing is started
when MPS is already in use (CUDA_MPS_PIPE_DIRECTORY set, or the default daemon's pipe
exists: the trials join it), when the driver's `nvidia-cuda-mps-control` is not installed,
or with `--mps off`.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

CONTROL = "nvidia-cuda-mps-control"
PIPE, LOG = "CUDA_MPS_PIPE_DIRECTORY", "CUDA_MPS_LOG_DIRECTORY"
DEFAULT_PIPE = Path("/tmp/nvidia-mps")  # where a system-wide daemon listens
MODES = ("auto", "off")


@dataclasses.dataclass
class Daemon:
    env: dict[str, str]  # what trial processes need to reach it
    root: Path
    control: str  # the control program that started it

    def stop(self) -> None:
        """Quit the daemon (it waits for its clients: stop the trials first)."""
        subprocess.run([self.control], input="quit\n", env={**os.environ, **self.env},
                       capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
        shutil.rmtree(self.root, ignore_errors=True)


def start(mode: str) -> tuple[Daemon | None, str]:
    """A private MPS daemon for mode `auto`, or None; with a line saying what was done."""
    if mode == "off":
        return None, "CUDA MPS off (--mps off): packed trials time-slice each GPU"
    if os.environ.get(PIPE) or (DEFAULT_PIPE / "control").exists():
        return None, "CUDA MPS: trials join the daemon already running"
    control = shutil.which(CONTROL)
    if control is None:
        return None, f"CUDA MPS unavailable ({CONTROL} not found): packed trials time-slice"
    root = Path(tempfile.mkdtemp(prefix="sweep-mps-"))  # short: the pipe is a UNIX socket
    env = {PIPE: str(root / "pipe"), LOG: str(root / "log")}
    for folder in env.values():
        Path(folder).mkdir()
    try:
        out = subprocess.run([control, "-d"], env={**os.environ, **env}, capture_output=True,
                             text=True, timeout=30, check=False)  # fmt: skip
        error = None if out.returncode == 0 else (out.stderr or out.stdout).strip()
    except (OSError, subprocess.TimeoutExpired) as err:
        error = str(err)
    if error is not None:
        shutil.rmtree(root, ignore_errors=True)
        reason = error[:200] or "no reason given"
        return None, f"CUDA MPS could not start ({reason}): packed trials time-slice each GPU"
    daemon = Daemon(env, root, control)
    return daemon, "CUDA MPS: packed trials share each GPU (a daemon of this sweep)"
