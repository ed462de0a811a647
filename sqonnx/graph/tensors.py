"""Constant tensors in an onnx-ir graph: reading them, giving a node a new one without touching anyone else's,
computing them lazily (deferred), reading them ahead."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from sqonnx.graph.match import STANDARD_DOMAINS
from sqonnx.math.smoothing import convert

# The float types a linear layer's weight may have: the model's own float type is kept for what stays float.
FLOAT_TYPES = (np.float32, np.float16, ir.DataType.BFLOAT16.numpy())
HALF_TYPES = (ir.DataType.FLOAT16, ir.DataType.BFLOAT16)


def opset_version(graph: ir.Graph) -> int:
    """The standard (ai.onnx) opset the graph imports; 0 when it imports none."""
    return next((graph.opset_imports[d] for d in STANDARD_DOMAINS if d in graph.opset_imports), 0)


def constant(value: ir.Value | None) -> np.ndarray | None:
    """The array behind an initializer input, or None when the value is computed at run time."""
    if value is None or value.const_value is None or not value.is_initializer():
        return None
    return value.const_value.numpy()


def is_constant(value: ir.Value | None) -> bool:
    """Whether the value is an initializer (its data is not read)."""
    return value is not None and value.const_value is not None and value.is_initializer()


def constant_shape(value: ir.Value | None) -> tuple[tuple[int, ...], np.dtype] | None:
    """Shape and numpy dtype of an initializer input, read without its data (a deferred rotation or a
    memory-mapped weight stays untouched); None when the value is computed at run time."""
    if value is None or value.const_value is None or not value.is_initializer():
        return None
    tensor = value.const_value
    try:
        dtype = tensor.dtype.numpy()
    except (TypeError, ValueError):  # no numpy dtype (4-bit types, strings)
        return None
    return tuple(int(d) for d in tensor.shape), dtype


@dataclass(frozen=True)
class Deferred:
    """An array computed when it is first read (`compute` runs again on every read): a rotated weight of a
    block that has not been reached yet costs no memory."""

    compute: Callable[[], np.ndarray]
    dtype: np.dtype
    shape: tuple[int, ...]
    source: ir.TensorProtocol | None = None  # what it is computed from (read ahead by `prefetch`)


SOURCE = "sqonnx.source"  # tensor.meta key: the tensor a deferred one is computed from
# Value.meta key on an initializer of a block (sqonnx.streaming.runner.extract_block) that nodes outside the block read
# too: its uses in the block's graph are not all its uses, so a fold must copy it, never rewrite it.
SHARED = "sqonnx.shared"


def only_reader(value: ir.Value) -> bool:
    """Whether the value's one use is all there is: rewriting it in place changes no other node."""
    return (len(value.uses()) == 1 and not value.is_graph_output() and not value.is_graph_input()
            and not value.meta.get(SHARED, False))


def deferred(source: ir.TensorProtocol, transform: Callable[[np.ndarray], np.ndarray],
             shape: tuple[int, ...] | None = None) -> Deferred:
    """`transform` of `source`'s array (of `shape`, default the source's), computed on read, in `source`'s dtype;
    a memory-mapped `source` is released after each read, so its pages leave the process's resident memory."""
    def compute() -> np.ndarray:
        array = source.numpy()
        try:
            result = np.asarray(transform(array)).astype(array.dtype, copy=False)
            return result.copy() if np.may_share_memory(result, array) else result
        finally:
            del array
            release(source)

    return Deferred(compute, source.dtype.numpy(), shape if shape is not None else tuple(source.shape), source)


def release(tensor: ir.TensorProtocol | None) -> None:
    """Unmap a memory-mapped tensor (its pages no longer count in RSS); others are left alone."""
    if isinstance(tensor, ir.ExternalTensor):
        with contextlib.suppress(BufferError):  # an array still viewing the map keeps it open
            tensor.release()


def set_constant_input(graph: ir.Graph, node: ir.Node, index: int, array: np.ndarray | Deferred,
                       suffix: str, *, keep_dtype: bool = True) -> None:
    """Give `node.inputs[index]` a new value `array` (computed on read when `Deferred`), in the old value's
    dtype unless `keep_dtype` is False.

    The initializer is rewritten in place when this node is its only reader; otherwise (tied or shared
    weights) the node gets its own copy named `<original><suffix>`, so no other node changes.
    """
    old = node.inputs[index]
    assert old is not None and old.name is not None
    if not isinstance(array, Deferred):
        dtype = old.const_value.dtype.numpy() if old.const_value and keep_dtype else None
        array = _contiguous(array, dtype)
    if only_reader(old):
        old.const_value = _tensor(array, str(old.name))
        old.type = ir.TensorType(old.const_value.dtype)  # a fresh type: clones share type objects
        return
    node.replace_input_with(index, add_initializer(graph, f"{old.name}{suffix}", array))


def _tensor(array: np.ndarray | Deferred, name: str) -> ir.TensorProtocol:
    if isinstance(array, Deferred):
        lazy = ir.LazyTensor(lambda: ir.tensor(array.compute(), name=name), dtype=ir.DataType.from_numpy(array.dtype),
                             shape=ir.Shape(array.shape), name=name)
        lazy.meta[SOURCE] = array.source
        return lazy
    return ir.tensor(array, name=name)


def prefetch(values: list[ir.Value]) -> None:
    """Ask the kernel to read ahead the file pages behind these initializers (their memory-mapped weights, or
    those a deferred rotation reads), in a thread: the next block's weights come off the disk while this
    block computes, instead of after (a 27 GB model does not stay in the page cache between blocks)."""
    ranges = []
    for value in values:
        tensor = value.const_value
        while tensor is not None and not isinstance(tensor, ir.ExternalTensor):
            tensor = tensor.meta.get(SOURCE) if isinstance(tensor, ir.LazyTensor) else None
        if tensor is not None and tensor.offset is not None and tensor.length:
            ranges.append((tensor.path, tensor.offset, tensor.length))
    if ranges and hasattr(os, "posix_fadvise"):
        threading.Thread(target=_read_ahead, args=(ranges,), daemon=True).start()


def _read_ahead(ranges: list[tuple[str, int, int]]) -> None:
    for path, offset, length in ranges:
        try:
            descriptor = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(descriptor, offset, length, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        finally:
            os.close(descriptor)


def add_initializer(graph: ir.Graph, name: str, array: np.ndarray | Deferred) -> ir.Value:
    """Register a new initializer under a deterministic name (made unique if it is taken)."""
    unique = name
    counter = 1
    while unique in graph.initializers:
        unique = f"{name}_{counter}"
        counter += 1
    tensor = _tensor(array if isinstance(array, Deferred) else _contiguous(array), unique)
    value = ir.Value(name=unique, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype),
                     const_value=tensor)
    graph.register_initializer(value)
    return value


def _contiguous(array: np.ndarray, dtype: np.dtype | None = None) -> np.ndarray:
    # np.ascontiguousarray would turn a scalar into shape [1]; scales and zero points must stay scalars.
    array = np.asarray(array)
    if dtype is not None and array.ndim:
        array = convert(array, np.dtype(dtype))
    return np.require(np.asarray(array, dtype=dtype), requirements="C")
