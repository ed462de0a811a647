"""Atomic saving: the output file appears whole and checked, or not at all."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import onnx
import onnx_ir as ir

from sqonnx.errors import SqonnxError

# Protobuf cannot serialize a model over 2 GiB; keep a margin for the graph itself.
EXTERNAL_DATA_BYTES = 1_800_000_000


def check_output_path(input_path: Path, output_path: Path) -> None:
    if output_path.resolve() == input_path.resolve():
        raise SqonnxError(f"output path {output_path} is the input model; choose another --output")
    if output_path.is_dir():
        raise SqonnxError(f"output path {output_path} is a folder; give a file name ending in .onnx")
    folder = output_path.parent
    if not folder.is_dir():
        raise SqonnxError(f"output folder {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK):
        raise SqonnxError(f"output folder {folder} is not writable; choose another --output")


def save_atomically(model: ir.Model, output_path: Path, validate: Callable[[Path], None],
                    external_data: bool = False) -> int:
    """Save to a temporary folder beside the output, check, then rename into place. Returns bytes written.

    Weights go to `<output>.data` when asked (the input had external data) or when the model would not
    fit in one protobuf.
    """
    tensor_bytes = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value)
    external_data = external_data or tensor_bytes > EXTERNAL_DATA_BYTES
    data_name = f"{output_path.name}.data" if external_data else None
    if data_name is None:  # weights memory-mapped from a working copy must go inline into the one file
        ir.external_data.load_to_model(model)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=".sqonnx-", dir=output_path.parent))
    except OSError as exc:
        raise SqonnxError(f"cannot write in {output_path.parent}: {exc.strerror}") from None
    try:
        staged = tmp / output_path.name
        try:
            ir.save(model, staged, external_data=data_name)
        except OSError as exc:
            raise SqonnxError(f"cannot write {output_path}: {exc.strerror}") from None
        _check(staged)
        validate(staged)
        written = staged.stat().st_size
        if data_name is not None:
            written += (tmp / data_name).stat().st_size
            os.replace(tmp / data_name, output_path.parent / data_name)
        os.replace(staged, output_path)
        return written
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# onnxruntime registers these contrib ops in the standard domain; its transformer optimizer (--optimize)
# writes them there, so onnx.checker does not know them although onnxruntime runs them.
ONNXRUNTIME_OPS_IN_STANDARD_DOMAIN = ("SimplifiedLayerNormalization",)


def _check(path: Path) -> None:
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        if not any(f"No Op registered for {op} " in str(exc) for op in ONNXRUNTIME_OPS_IN_STANDARD_DOMAIN):
            raise
