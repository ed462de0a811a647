"""A test hook that parks the process at a named point, so a test can signal or kill it exactly there.

Signals that race with the work (Ctrl-C "a little after calibration starts") make tests that pass on an idle
machine and fail on a loaded one. With `SQONNX_PAUSE_AT=<point>=<marker file>` in the environment, the
process writes the marker file when it reaches `<point>` and then waits there while the file exists; the test
waits for the marker, then sends SIGINT, SIGTERM or SIGKILL, or deletes the marker to let it go on (two
writers released at once). Points: `calibration` (after the first
calibration sample), `staged` (output written and checked in the staging folder, before it is moved),
`data-moved` (the new weights file is in place, the .onnx not yet), `onnx-moved` (both in place, stale
weights files not yet removed), `block-<n>` (block n, from 0, calibrated and kept in --cache-dir).
Unset (always, outside tests), `pause_point` only reads one variable.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

ENV = "SQONNX_PAUSE_AT"


def pause_point(point: str) -> None:
    """Park here, while the marker file exists, when the test hook names this point."""
    wanted = os.environ.get(ENV)
    if not wanted:
        return
    name, _, marker = wanted.partition("=")
    if name != point or not marker:
        return
    Path(marker).write_text(str(os.getpid()))
    while os.path.exists(marker):  # or until a signal: KeyboardInterrupt from a handler, or SIGKILL
        time.sleep(0.02)
