"""Starting `sqonnx` parked at a named point (the SQONNX_PAUSE_AT hook, sqonnx/pause.py), for tests that
signal or kill it exactly there."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from tests.child import failure, start

REACH_TIMEOUT = 300  # seconds for a child to reach its pause point (a loaded machine takes a few)


def start_paused(args: list[str | Path], point: str, tmp_path: Path,
                 tag: str = "") -> tuple[subprocess.Popen[str], Path]:
    """Start `sqonnx` with the test hook that parks it at `point` (sqonnx/pause.py) and wait until it is there.

    The signal then lands exactly at that point, however loaded the machine is: no sleeps, no race. TMPDIR is
    a folder of the test's own, so its temporary folders can be checked afterwards. Deleting the marker file
    (`marker_of`) lets the process go on. The child takes SIGINT and SIGTERM as a terminal's would (tests.child).
    """
    marker = tmp_path / f"at-{point}{tag}"
    temp = tmp_path / "tmp"
    temp.mkdir(exist_ok=True)
    process = start(args, {"TMPDIR": str(temp), "SQONNX_PAUSE_AT": f"{point}={marker}"})
    deadline = time.monotonic() + REACH_TIMEOUT
    while not marker.exists():
        if process.poll() is not None:
            raise AssertionError(failure(process, f"exited with code {process.returncode} before reaching {point}"))
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(failure(process, f"still short of {point} after {REACH_TIMEOUT} s, killed"))
        time.sleep(0.02)
    return process, temp


def ours(temp: Path) -> list[Path]:
    """sqonnx's temporary folders in TMPDIR (onnxruntime's import leaves a .ses file of its own there)."""
    return [p for p in temp.iterdir() if p.name.startswith("sqonnx-")]


def marker_of(point: str, tmp_path: Path, tag: str = "") -> Path:
    return tmp_path / f"at-{point}{tag}"
