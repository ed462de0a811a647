"""The layer order (pyproject.toml, [tool.importlinter]) holds: no package imports one above it, no package's
modules import each other in a cycle. import-linter reads every import, those inside functions too."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"

pytestmark = pytest.mark.skipif(not LINT_IMPORTS.exists(), reason="import-linter is in the `dev` extra")


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    """`lint-imports` on the `sqonnx` package under `root`, with the contracts of this repository."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([str(LINT_IMPORTS), str(REPO / "pyproject.toml"), "--no-cache"], cwd=root,
                          env=env, capture_output=True, text=True, timeout=120)


def test_layers_and_no_cycles() -> None:
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 2 kept, 0 broken." in result.stdout, result.stdout


@pytest.mark.parametrize(("module", "line", "contract"), [
    ("math/smoothing.py", "from sqonnx.run import build", "layers, top to bottom BROKEN"),  # upward
    ("passes/absorbers/base.py", "from sqonnx.passes import smoothing_groups",
     "no import cycle inside a package BROKEN"),
])
def test_a_broken_layer_is_caught(tmp_path: Path, module: str, line: str, contract: str) -> None:
    """The check fails where it should: an upward import, and a cycle inside `passes` (the smoothing groups
    import the absorbers)."""
    shutil.copytree(REPO / "sqonnx", tmp_path / "sqonnx", ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path / "sqonnx" / module
    target.write_text(target.read_text() + f"\n\ndef _injected() -> None:\n    {line}  # noqa\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0 and contract in result.stdout, result.stdout
