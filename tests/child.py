"""`python -m sqonnx` as a child of the tests: started the same way however pytest was started, and never waited
for without a bound and a reason.

What a child would otherwise take from the environment pytest runs in:
- signal dispositions: a background job of a non-interactive shell (`cmd &` in a script, as CI systems and
  schedulers start suites) starts with SIGINT and SIGQUIT ignored, and an ignored signal stays ignored across
  exec; Python then installs no KeyboardInterrupt handler, and the Ctrl-C a test sends is lost. The signals the
  tests send (SENT) are set back to their default and unblocked in the child. SIGHUP stays as inherited: no test
  sends it, and ignoring it is what `nohup` is for. subprocess already restores SIGPIPE and SIGXFSZ.
- the terminal: stdin is /dev/null, stdout and stderr are pipes, so no progress bar is drawn and nothing waits
  for input, whether pytest runs on a terminal or not.
- the locale: PYTHONUTF8=1, and the output is read as UTF-8 (sqonnx's help and HTML report have α and →).
- the working folder: the repository root, so `-m sqonnx` imports this checkout, as pytest's `pythonpath = ["."]`
  does for the tests themselves (from another folder it would import whatever sqonnx is installed).
- SQONNX_PAUSE_AT (the test hook, sqonnx/pause.py): only where a test sets it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SENT = (signal.SIGINT, signal.SIGTERM)  # what tests send a child (SIGKILL can be neither ignored nor blocked)


def _default_dispositions() -> None:
    """Runs in the child between fork and exec."""
    for number in SENT:
        signal.signal(number, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SENT)


def start(args: list[str | Path] | tuple[str | Path, ...], env: Mapping[str, str] | None = None,
          ) -> subprocess.Popen[str]:
    """`python -m sqonnx *args`, with `env` added to the environment, stdout and stderr piped."""
    base = {key: value for key, value in os.environ.items() if key != "SQONNX_PAUSE_AT"}
    return subprocess.Popen([sys.executable, "-m", "sqonnx", *map(str, args)], cwd=REPO,
                            env={**base, "PYTHONUTF8": "1", **(env or {})}, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, encoding="utf-8",
                            preexec_fn=_default_dispositions)


def finish(process: subprocess.Popen[str], what: str, timeout: float) -> tuple[str, str]:
    """Wait up to `timeout` seconds for the child to exit; returns its (stdout, stderr). If it does not, kill it
    and fail naming what was waited for and what it printed so far."""
    try:
        return process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        raise AssertionError(failure(process, f"{what}: still running after {timeout:g} s, killed")) from None


def failure(process: subprocess.Popen[str], reason: str) -> str:
    """`reason` and what the child printed (it has exited or been killed: reading its pipes ends)."""
    stdout, stderr = process.communicate()
    return f"{reason} (`{' '.join(map(str, process.args[2:]))}`); stdout: {stdout!r}; stderr: {stderr!r}"


def run_sqonnx(*args: str | Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """`python -m sqonnx *args` to the end, as subprocess.run with capture_output and text."""
    process = start(args)
    stdout, stderr = finish(process, "sqonnx did not exit", timeout)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def run_measured(args: list[str | Path], what: str, timeout: float) -> tuple[int, str, int]:
    """`python -m sqonnx *args` to the end, with its peak resident memory (the kernel's count, wait4): returns the
    exit code, what it printed (stdout and stderr, to a file: a pipe nobody reads while waiting could fill and stall
    the child) and the peak in bytes. Past `timeout` seconds the child is killed and the test fails with its
    output."""
    with tempfile.TemporaryFile(mode="w+", encoding="utf-8") as output:
        base = {key: value for key, value in os.environ.items() if key != "SQONNX_PAUSE_AT"}
        process = subprocess.Popen([sys.executable, "-m", "sqonnx", *map(str, args)], cwd=REPO,
                                   env={**base, "PYTHONUTF8": "1"}, stdin=subprocess.DEVNULL, stdout=output,
                                   stderr=subprocess.STDOUT, preexec_fn=_default_dispositions)
        deadline = time.monotonic() + timeout
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                process.kill()
                os.wait4(process.pid, 0)
                process.returncode = -signal.SIGKILL
                output.seek(0)
                raise AssertionError(f"{what}: still running after {timeout:g} s, killed; output: "
                                     f"{output.read()[-3000:]!r}")
            time.sleep(0.1)
        process.returncode = os.waitstatus_to_exitcode(status)
        output.seek(0)
        return process.returncode, output.read(), usage.ru_maxrss * 1024
