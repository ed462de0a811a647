"""Reading the model and the few graph facts every pass needs: which nodes are linear layers with a
constant weight, and how to give a node a new constant without touching anyone else's."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from sqonnx.errors import SqonnxError
from sqonnx.smoothing import convert


def load_model(path: Path) -> ir.Model:
    """Load an ONNX model, turning the ways a file can be wrong into one-line errors."""
    if not path.exists():
        raise SqonnxError(f"model file not found: {path}")
    if path.is_dir():
        raise SqonnxError(f"{path} is a folder; pass the .onnx file inside it")
    dangling = _DanglingInputs()
    serde_logger = logging.getLogger("onnx_ir.serde")
    serde_logger.addFilter(dangling)
    try:
        model = ir.load(path)
    except Exception as exc:  # protobuf raises several unrelated types for junk input
        raise SqonnxError(f"{path} is not a readable ONNX model ({type(exc).__name__}); "
                          "pass a .onnx file exported by optimum or torch.onnx") from None
    finally:
        serde_logger.removeFilter(dangling)
    for tensor_value in model.graph.initializers.values():
        tensor = tensor_value.const_value
        if isinstance(tensor, ir.ExternalTensor) and not Path(tensor.path).exists():
            raise SqonnxError(f"external data file {tensor.path} of {path.name} is missing; "
                              "keep the .onnx file beside its data file")
    _check_graph(model, path, dangling.names)
    _check_initializers(model, path)
    _check_onnx(path)
    return model


class _DanglingInputs(logging.Filter):
    """Collects the inputs onnx_ir could not resolve while loading ("cannot be found in any scope"), and keeps
    its one warning per reader off the console: `_check_graph` turns them into one error line."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if "cannot be found in any scope" not in record.getMessage():
            return True
        args = record.args if isinstance(record.args, tuple) else ()
        self.names.append(f"node '{args[1]}' reads '{args[0]}'" if len(args) > 1 else record.getMessage())
        return False


REEXPORT = "re-export it, or find the fault with onnx.checker.check_model(path, full_check=True)"


def _check_graph(model: ir.Model, path: Path, dangling: list[str]) -> None:
    """Refuse graphs that onnxruntime cannot run, before any work: every input a node reads must be defined
    by a graph input, an initializer or an earlier node (ONNX requires nodes in topological order, so a cycle
    shows up here too), no value may have two producers, and the graph must have an output."""
    graph = model.graph
    if dangling:
        more = f" (and {len(dangling) - 1} more)" if len(dangling) > 1 else ""
        raise SqonnxError(f"{path.name} is not a valid ONNX graph: {dangling[0]}{more}, which no graph input, "
                          f"initializer or earlier node defines (missing, or nodes in a cycle); {REEXPORT}")
    if not graph.outputs:
        raise SqonnxError(f"{path.name} has no graph outputs; {REEXPORT}")
    produced: set[str] = set()
    for node in graph:
        for value in node.outputs:
            if value.name and (value.name in produced or value.is_graph_input() or value.is_initializer()):
                raise SqonnxError(f"{path.name} is not a valid ONNX graph: value '{value.name}' is written twice "
                                  f"(last by node '{node.name}'); {REEXPORT}")
            produced.add(str(value.name))


def _check_onnx(path: Path) -> None:
    """onnx.checker on the input, as the output gets it: a model that breaks the ONNX spec (attribute of the wrong
    type, IR version, unknown standard op) is refused now with the checker's reason, not after calibration."""
    from sqonnx.output import check_onnx

    try:
        check_onnx(path)
    except Exception as exc:  # ValidationError, and the C++ checker's other failures
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        reason = " ".join(lines[0].split())[:200]
        raise SqonnxError(f"{path.name} fails onnx.checker ({reason}); {REEXPORT}") from None


def _check_initializers(model: ir.Model, path: Path) -> None:
    """Every initializer's data must match its declared type and dims (a flipped bit in a model file often
    lands there); memory-mapped external data is mapped, not read."""
    for name, value in model.graph.initializers.items():
        tensor = value.const_value
        if tensor is None:
            continue
        try:
            dims = tuple(tensor.shape)
            shape = tensor.numpy().shape  # no reference to the array is kept: the memory map can be released
            if any(not isinstance(d, int) or d < 0 for d in dims) or shape != dims:
                raise ValueError(f"dims {list(dims)}")
        except Exception as exc:  # numpy and onnx_ir raise ValueError, TypeError, AssertionError, OSError...
            reason = " ".join(str(exc).split())[:120]
            raise SqonnxError(f"initializer '{name}' of {path.name} does not hold the data its type and dims "
                              f"declare ({reason}); the file is damaged: {REEXPORT}") from None
        finally:
            if isinstance(tensor, ir.ExternalTensor):
                with contextlib.suppress(BufferError):  # a failed read may still hold a view of the map
                    tensor.release()


# The float types a linear layer's weight may have: the model's own float type is kept for what stays float.
FLOAT_TYPES = (np.float32, np.float16, ir.DataType.BFLOAT16.numpy())
HALF_TYPES = (ir.DataType.FLOAT16, ir.DataType.BFLOAT16)


def opset_version(graph: ir.Graph) -> int:
    """The standard (ai.onnx) opset the graph imports; 0 when it imports none."""
    return graph.opset_imports.get("", graph.opset_imports.get("ai.onnx", 0))


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
class LinearLayer:
    """A MatMul or Gemm whose right-hand operand is a constant 2-D weight."""

    node: ir.Node
    # Axis of the weight that multiplies the activation's last axis: 0 for MatMul and Gemm(transB=0)
    # ([in, out] layout), 1 for Gemm(transB=1) ([out, in] layout).
    in_axis: int

    @property
    def name(self) -> str:
        return self.node.name or self.node.outputs[0].name

    @property
    def activation(self) -> ir.Value:
        value = self.node.inputs[0]
        assert value is not None
        return value

    @property
    def weight_value(self) -> ir.Value:
        value = self.node.inputs[1]
        assert value is not None
        return value

    @property
    def weight(self) -> np.ndarray:
        array = constant(self.weight_value)
        assert array is not None
        return array

    @property
    def bias_value(self) -> ir.Value | None:
        return self.node.inputs[2] if self.node.op_type == "Gemm" and len(self.node.inputs) > 2 else None

    @property
    def shape(self) -> tuple[int, ...]:
        """The weight's shape, read without its data."""
        found = constant_shape(self.weight_value)
        assert found is not None
        return found[0]

    @property
    def in_channels(self) -> int:
        return self.shape[self.in_axis]

    @property
    def out_channels(self) -> int:
        return self.shape[1 - self.in_axis]


def as_linear_layer(node: ir.Node) -> LinearLayer | None:
    if node.domain not in ("", "ai.onnx") or node.op_type not in ("MatMul", "Gemm"):
        return None
    weight = constant_shape(node.inputs[1]) if len(node.inputs) > 1 else None
    if weight is None or len(weight[0]) != 2 or weight[1] not in FLOAT_TYPES:
        return None
    if node.op_type == "MatMul":
        return LinearLayer(node, in_axis=0)
    attrs = node.attributes
    if attrs.get_int("transA", 0) or attrs.get_float("alpha", 1.0) != 1.0:
        return None
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    if bias is not None and attrs.get_float("beta", 1.0) != 1.0:
        return None
    if bias is not None and not is_constant(bias):
        return None
    return LinearLayer(node, in_axis=1 if attrs.get_int("transB", 0) else 0)


def find_linear_layers(graph: ir.Graph) -> list[LinearLayer]:
    """Linear layers in graph order."""
    return [layer for node in graph if (layer := as_linear_layer(node)) is not None]


@dataclass(frozen=True)
class Deferred:
    """An array computed when it is first read (`compute` runs again on every read): a rotated weight of a
    block that has not been reached yet costs no memory."""

    compute: Callable[[], np.ndarray]
    dtype: np.dtype
    shape: tuple[int, ...]
    source: ir.TensorProtocol | None = None  # what it is computed from (read ahead by `prefetch`)


SOURCE = "sqonnx.source"  # tensor.meta key: the tensor a deferred one is computed from
# Value.meta key on an initializer of a block (sqonnx.streaming.extract_block) that nodes outside the block read
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


# What may sit between a language model's LM head and its `logits` output: casts, reshapes, a bias, Gemma 2's
# soft-capping (Div, Tanh, Mul by constants).
_TO_OUTPUT = {"Cast", "Identity", "Reshape", "Squeeze", "Unsqueeze", "Add", "Div", "Mul", "Tanh"}


def output_layer(graph: ir.Graph) -> LinearLayer | None:
    """The linear layer that computes the model's first output (a language model's LM head), if one does."""
    value: ir.Value | None = graph.outputs[0] if graph.outputs else None
    for _ in range(8):
        node = value.producer() if value is not None else None
        if node is None:
            return None
        layer = as_linear_layer(node)
        if layer is not None:
            return layer
        if node.op_type not in _TO_OUTPUT:
            return None
        varying = [v for v in node.inputs if v is not None and not is_constant(v)]
        if len(varying) != 1:
            return None
        value = varying[0]
    return None
