"""onnxruntime is an extra (sqonnx[cpu] or sqonnx[gpu]): say which to install, and warn when both are."""

from __future__ import annotations

import contextlib
import warnings
from importlib.metadata import PackageNotFoundError, version


def check_onnxruntime() -> None:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        raise ImportError("sqonnx needs onnxruntime: pip install 'sqonnx[cpu]', or 'sqonnx[gpu]' on a machine with an "
                          "NVIDIA GPU") from None
    installed = []
    for dist in ("onnxruntime", "onnxruntime-gpu"):
        with contextlib.suppress(PackageNotFoundError):
            installed.append(f"{dist} {version(dist)}")
    if len(installed) == 2:
        warnings.warn(f"{' and '.join(installed)} are both installed and overwrite each other's files: pip uninstall "
                      "both, then install the one you need (onnxruntime-gpu also runs on the CPU)", stacklevel=2)
