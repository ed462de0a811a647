"""Reading a model: every way a file can be wrong turned into a one-line error; onnx.checker as the output gets it."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import onnx
import onnx_ir as ir

from sqonnx.errors import SqonnxError


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


def save_model_proto(proto: onnx.ModelProto, folder: Path) -> Path:
    """An in-memory model (`sqonnx.quantize`'s ModelProto route) as a file the run reads like any other: saved as it
    is, its weights inside (a model over protobuf's 2 GB into a data file beside it, from a copy: the caller's proto
    is left as it was). Tensors that point to external data refer to a folder the proto does not name: refused."""
    for tensor in proto.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            location = next((entry.value for entry in tensor.external_data if entry.key == "location"), "?")
            raise SqonnxError(f"the ModelProto's initializer {tensor.name} keeps its data in {location}, which "
                              "sqonnx cannot find without the model's folder: pass the model's path instead, or "
                              "load it with onnx.load(path) (which reads the data in)")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    if proto.ByteSize() < onnx.checker.MAXIMUM_PROTOBUF:
        onnx.save_model(proto, path)
    else:
        copy = onnx.ModelProto()
        copy.CopyFrom(proto)
        onnx.save_model(copy, path, save_as_external_data=True, location=f"{path.name}.data")
    return path


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
