"""Starting `sqonnx` parked at a named point (the SQONNX_PAUSE_AT hook, sqonnx/pause.py), for tests that
signal or kill it exactly there."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path


def start_paused(args: list[str | Path], point: str, tmp_path: Path,
                 tag: str = "") -> tuple[subprocess.Popen[str], Path]:
    """Start `sqonnx` with the test hook that parks it at `point` (sqonnx/pause.py) and wait until it is there.

    The signal then lands exactly at that point, however loaded the machine is: no sleeps, no race. TMPDIR is
    a folder of the test's own, so its temporary folders can be checked afterwards. Deleting the marker file
    (`marker_of`) lets the process go on.
    """
    marker = tmp_path / f"at-{point}{tag}"
    temp = tmp_path / "tmp"
    temp.mkdir(exist_ok=True)
    env = {**os.environ, "TMPDIR": str(temp), "SQONNX_PAUSE_AT": f"{point}={marker}"}
    process = subprocess.Popen([sys.executable, "-m", "sqonnx", *map(str, args)], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not marker.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"never reached {point}: {process.communicate()}")
        time.sleep(0.02)
    return process, temp


def ours(temp: Path) -> list[Path]:
    """sqonnx's temporary folders in TMPDIR (onnxruntime's import leaves a .ses file of its own there)."""
    return [p for p in temp.iterdir() if p.name.startswith("sqonnx-")]


def marker_of(point: str, tmp_path: Path, tag: str = "") -> Path:
    return tmp_path / f"at-{point}{tag}"
