"""A float32 copy of a float16 / bfloat16 model, for calibration.

FP16 and BF16 exports are calibrated in float32: the statistics are then those of the exact upcast (every
half value is a float32 value), nothing saturates at 65504 on the way, and onnxruntime's CPU provider, whose
kernels cover float32 best (bfloat16 barely at all), runs every op. The copy shares nothing the caller can
change: its half initializers are new float32 arrays, its Casts to a half type cast to float32 instead, and
every half-typed value is float32.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from sqonnx.graph.tensors import HALF_TYPES
from sqonnx.math.smoothing import as_float32

_FLOAT = ir.DataType.FLOAT


class UpcastToFloat32Pass(ir.passes.FunctionalPass):
    """A clone of the model with every float16 / bfloat16 type, constant and Cast target made float32."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        copy = model.clone()
        return ir.passes.PassResult(copy, modified=_upcast(copy.graph))


def upcast_to_float32(model: ir.Model) -> ir.Model:
    return UpcastToFloat32Pass()(model).model


def _upcast(graph: ir.Graph) -> bool:
    modified = False
    for value in graph.initializers.values():
        tensor = value.const_value
        if tensor is not None and tensor.dtype in HALF_TYPES:
            value.const_value = ir.tensor(as_float32(tensor.numpy()), name=value.name)
            modified = True
    for value in (*graph.inputs, *graph.outputs, *graph.initializers.values()):
        modified |= _upcast_type(value)
    for node in ir.traversal.RecursiveGraphIterator(graph):
        for out in node.outputs:
            modified |= _upcast_type(out)
        for name, attr in list(node.attributes.items()):
            if name == "to" and node.op_type == "Cast" and attr.value in [t.value for t in HALF_TYPES]:
                node.attributes[name] = ir.AttrInt64(name, _FLOAT.value)
                modified = True
            elif attr.type == ir.AttributeType.TENSOR and attr.value.dtype in HALF_TYPES:
                array = attr.value.numpy().astype(np.float32)
                node.attributes[name] = ir.AttrTensor(name, ir.tensor(array, name=attr.value.name))
                modified = True
    return modified


def _upcast_type(value: ir.Value) -> bool:
    if value.dtype in HALF_TYPES:
        value.type = ir.TensorType(_FLOAT)  # a clone shares its type objects with the original
        return True
    return False
