"""Atomic saving: the output file appears whole and checked, or not at all."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import onnx
import onnx_ir as ir

from sqonnx.errors import SqonnxError
from sqonnx.pause import pause_point

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
                    external_data: bool = False, companions: dict[str, bytes] | None = None) -> int:
    """Save to a staging folder beside the output, check, then move into place. Returns bytes written.

    Weights go to a data file beside the output when asked (the input had external data) or when the model
    would not fit in one protobuf. Two renames (data file, then .onnx) are not atomic together, so the data
    file is named after its content, `<output>.<digest>.data`: the new .onnx refers to its own data file,
    the previous .onnx keeps its own until the new one has replaced it, and only then are stale data files
    removed. A process killed at any point leaves the previous model or the new one at `output_path`, both
    whole. Moving into place holds a lock on the folder, so two processes writing the same output never
    remove each other's data file; the last one to finish wins. `companions` (file name -> bytes, e.g. an
    onnxruntime-genai config) are staged too and moved in before the .onnx.
    """
    tensor_bytes = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value)
    external_data = external_data or tensor_bytes > EXTERNAL_DATA_BYTES
    if not external_data:  # weights memory-mapped from a working copy must go inline into the one file
        ir.external_data.load_to_model(model)
    folder = output_path.parent
    remove_stale_staging(folder)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=folder))
    except OSError as exc:
        raise SqonnxError(f"cannot write in {folder}: {exc.strerror}") from None
    try:
        data_name = f"{output_path.name}.{weights_digest(model)}.data" if external_data else None
        staged = tmp / output_path.name
        try:
            ir.save(model, staged, external_data=data_name)
        except OSError as exc:
            raise SqonnxError(f"cannot write {output_path}: {exc.strerror}") from None
        check_onnx(staged)
        validate(staged)
        written = staged.stat().st_size + ((tmp / data_name).stat().st_size if data_name else 0)
        for name, content in (companions or {}).items():
            try:
                (tmp / name).write_bytes(content)
            except OSError as exc:
                raise SqonnxError(f"cannot write {folder / name}: {exc.strerror}") from None
        pause_point("staged")
        with _folder_lock(folder):
            if data_name is not None:
                os.replace(tmp / data_name, folder / data_name)
                pause_point("data-moved")
            for name in companions or {}:
                os.replace(tmp / name, folder / name)
            os.replace(staged, output_path)
            pause_point("onnx-moved")
            for stale in stale_data_files(output_path, keep=data_name):
                stale.unlink(missing_ok=True)
        return written
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


STAGING_PREFIX = ".sqonnx-"
_DIGEST_CHARS = 16


def weights_digest(model: ir.Model) -> str:
    """A digest of every initializer (name, type, shape, bytes): names the data file after its content, so the
    same weights give the same file name (byte-identical output) and different weights never share one."""
    digest = hashlib.sha256()
    for name, value in sorted(model.graph.initializers.items()):
        tensor = value.const_value
        if tensor is None:
            continue
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.tobytes())
    return digest.hexdigest()[:_DIGEST_CHARS]


def stale_data_files(output_path: Path, keep: str | None) -> list[Path]:
    """Data files an earlier save of `output_path` left that the current .onnx no longer refers to."""
    pattern = re.compile(re.escape(output_path.name) + rf"\.[0-9a-f]{{{_DIGEST_CHARS}}}\.data")
    return [p for p in output_path.parent.iterdir() if pattern.fullmatch(p.name) and p.name != keep]


def remove_stale_staging(folder: Path) -> None:
    """Remove staging folders of sqonnx processes that were killed (SIGKILL, power loss) while saving here.

    The owner's process id is in the folder's name; a folder whose owner still runs on this machine (another
    save into the same folder right now) is left alone.
    """
    for path in folder.glob(f"{STAGING_PREFIX}*"):
        owner = path.name[len(STAGING_PREFIX):].split("-", 1)[0]
        if path.is_dir() and owner.isdigit() and not _running(int(owner)):
            shutil.rmtree(path, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, but belongs to someone else
        return True
    return True


@contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive lock on the output folder while files are moved into it (released if the process dies)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock; a single writer is still safe
        yield
        return
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)


# onnxruntime registers these contrib ops in the standard domain; its transformer optimizer (--optimize)
# writes them there, so onnx.checker does not know them although onnxruntime runs them.
ONNXRUNTIME_OPS_IN_STANDARD_DOMAIN = ("SimplifiedLayerNormalization",)


def check_onnx(path: Path) -> None:
    """onnx.checker on a saved model (read from the path, so models over 2 GB work)."""
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        if not any(f"No Op registered for {op} " in str(exc) for op in ONNXRUNTIME_OPS_IN_STANDARD_DOMAIN):
            raise
