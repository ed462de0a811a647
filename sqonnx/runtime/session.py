"""onnxruntime sessions over an in-memory onnx-ir model: the one place sqonnx sets a session up.

A block of a large model (or a whole small one) is never written to disk to be run. Its large initializers go
to onnxruntime as `OrtValue`s that point at the arrays sqonnx already holds (memory-mapped weights, rotated or
quantized arrays): the serialized graph declares them as external data and `add_external_initializers`
supplies them, so onnxruntime neither copies nor re-reads them and they are still constants (its QDQ fusions
and weight pre-packing need constant weights; pre-packing made a 4096 x 11008 MLP 25 % faster, for one packed
copy of the weights while the session lives).

A float16 / bfloat16 model is run in float32 when asked (`float32=True`): its calibration statistics are
then those of the exact float32 upcast, and onnxruntime's CPU kernels, which cover float32 best, run it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from sqonnx.errors import SqonnxError
from sqonnx.graph.tensors import HALF_TYPES

logger = logging.getLogger(__name__)

# Initializers at least this large are handed to onnxruntime from memory instead of being serialized.
IN_MEMORY_BYTES = 1024
IN_MEMORY_LOCATION = "sqonnx-in-memory.bin"  # never opened: onnxruntime takes the data from the OrtValues


# Pre-packing a block's weights costs about as much as running 2500 tokens through it saves (a 176 MB
# TinyLlama block: 0.25 s to pack, runs 25 % faster): sessions that run fewer tokens skip it.
PREPACK_TOKENS = 4096


class Session:
    """An onnxruntime session and the arrays it reads (they must outlive it)."""

    def __init__(self, session: ort.InferenceSession, keep: list[ort.OrtValue]) -> None:
        self.session = session
        self._keep = keep
        self.input_types = {i.name: _FLOATS.get(i.type) for i in session.get_inputs()}
        self.input_names = set(self.input_types)
        self.output_names = [o.name for o in session.get_outputs()]

    def run(self, fetch: list[str], feeds: dict[str, np.ndarray], where: str) -> list[np.ndarray]:
        """Run with the feeds the model takes (others are ignored); a failure names `where`. Float feeds are cast
        to the float type each input declares: values carried from a block run in float32 (calibration) feed a
        float16 block as well. Nothing to fetch: nothing runs (onnxruntime would return every output)."""
        if not fetch:
            return []
        wanted = {}
        for name, array in feeds.items():
            if name in self.input_names:
                dtype = self.input_types[name]
                cast = dtype is not None and array.dtype != dtype and array.dtype.kind == "f"
                wanted[name] = array.astype(dtype) if cast else array
        try:
            return self.session.run(fetch, wanted)
        except Exception as exc:
            raise SqonnxError(f"{where} does not fit the model: {str(exc).splitlines()[0]}") from None


CPU = ["CPUExecutionProvider"]
# CUDA for calibration: no TF32 (its 10-bit mantissa would move the maxima and Hessians by 1e-3 and more), the CPU
# for what CUDA has no kernel for.
CUDA: list[str | tuple[str, dict[str, str]]] = [("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"]


def calibration_providers(choice: str) -> tuple[list[str | tuple[str, dict[str, str]]], str]:
    """Where calibration runs for --calibration-provider `choice` (auto, cpu, cuda), and a line to say when CUDA
    was asked for and cannot be had."""
    available = "CUDAExecutionProvider" in ort.get_available_providers()
    if choice == "cpu" or (choice == "auto" and not available):
        return list(CPU), ""
    if available:
        return list(CUDA), ""
    return list(CPU), ("--calibration-provider cuda: this onnxruntime has no CUDA provider (install onnxruntime-gpu "
                       "instead of onnxruntime, on a machine with an NVIDIA GPU); calibrating on the CPU")


def open_session(model: ir.Model, *, float32: bool = False, optimized_path: Path | None = None,
                 prepack: bool = True, what: str = "the model",
                 providers: list[str | tuple[str, dict[str, str]]] | None = None) -> Session:
    """A session over `model` as it is in memory, on the CPU unless `providers` (calibration on CUDA).
    `float32`: run half-precision models in float32.
    `optimized_path`: also write onnxruntime's optimized graph there (which kernels it really runs).
    `prepack`: let onnxruntime pre-pack the weights, which pays only over many tokens (see PREPACK_TOKENS)."""
    if float32 and has_half_floats(model):
        from sqonnx.runtime.upcast import upcast_to_float32

        model = upcast_to_float32(model)
    graph = model.graph
    arrays: dict[str, np.ndarray] = {}
    originals: dict[str, ir.TensorProtocol] = {}
    for name, value in graph.initializers.items():
        tensor = value.const_value
        if tensor is None:
            continue
        if tensor.nbytes < IN_MEMORY_BYTES or tensor.dtype not in _NUMPY_BACKED:
            if isinstance(tensor, (ir.ExternalTensor, ir.LazyTensor)):  # serialized with its data
                originals[name] = tensor
                value.const_value = ir.tensor(tensor.numpy(), name=name)
            continue
        arrays[name] = np.ascontiguousarray(tensor.numpy())
        originals[name] = tensor
        value.const_value = ir.ExternalTensor(IN_MEMORY_LOCATION, 0, tensor.nbytes, tensor.dtype,
                                              shape=ir.Shape(tensor.shape), name=name)
    try:
        proto = ir.serde.serialize_model(model)
    finally:
        for name, tensor in originals.items():
            graph.initializers[name].const_value = tensor
    options = ort.SessionOptions()
    # Fatal only: a failure is reported as one error line, not also as onnxruntime's own log line.
    options.log_severity_level = 4
    if not prepack:
        options.add_session_config_entry("session.disable_prepacking", "1")
    keep = [ort.OrtValue.ortvalue_from_numpy(array) for array in arrays.values()]
    if arrays:
        options.add_external_initializers(list(arrays), keep)
    if optimized_path is not None:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.optimized_model_filepath = str(optimized_path)
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                         f"{optimized_path.name}.data")
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                         "1024")
    try:
        session = ort.InferenceSession(proto.SerializeToString(), options, providers=providers or CPU)
    except Exception as exc:
        raise SqonnxError(f"onnxruntime cannot run {what}: {str(exc).splitlines()[0]}") from None
    return Session(session, keep)


_FLOATS = {"tensor(float)": np.dtype(np.float32), "tensor(float16)": np.dtype(np.float16),
           "tensor(double)": np.dtype(np.float64)}

# dtypes whose numpy arrays onnxruntime takes as OrtValues (bfloat16 has no numpy dtype of its own there)
_NUMPY_BACKED = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.INT8,
                           ir.DataType.UINT8, ir.DataType.INT16, ir.DataType.UINT16, ir.DataType.INT32,
                           ir.DataType.UINT32, ir.DataType.INT64, ir.DataType.UINT64, ir.DataType.BOOL})


def open_file_session(path: Path, what: str) -> Session:
    """A CPU session over a saved model, its weights read by onnxruntime from the file (and its data file): what a
    deployment runs. A model onnxruntime cannot load is one error line naming `what`."""
    options = ort.SessionOptions()
    options.log_severity_level = 4
    try:
        session = ort.InferenceSession(str(path), options, providers=CPU)
    except Exception as exc:
        raise SqonnxError(f"onnxruntime cannot run {what} ({path}): {str(exc).splitlines()[0]}") from None
    return Session(session, [])


def has_half_floats(model: ir.Model, types: tuple[ir.DataType, ...] = HALF_TYPES) -> bool:
    """Whether any value or initializer of the model is float16 or bfloat16 (or of `types`)."""
    graph = model.graph
    if any(v.const_value is not None and v.const_value.dtype in types for v in graph.initializers.values()):
        return True
    return any(v.dtype in types for v in (*graph.inputs, *graph.outputs)) or any(
        out.dtype in types for node in graph for out in node.outputs)


def cpu_runs(model: ir.Model) -> bool:
    """Whether onnxruntime's CPU provider runs the model as it is: it has no bfloat16 kernels."""
    return not has_half_floats(model, (ir.DataType.BFLOAT16,))
