"""Where nothing can absorb 1/s: multiply X by 1/s explicitly, in front of the group only.

The other readers of X keep the original value. This costs one elementwise op per group at run time,
which is why it is judged (`--unabsorbed auto`) or asked for (`--unabsorbed mul`). The factor is in the
activation's own float type.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from sqonnx.graph.tensors import add_initializer
from sqonnx.passes.smoothing_groups import SmoothingGroup


def insert_smoothing_mul(graph: ir.Graph, group: SmoothingGroup, scales: np.ndarray) -> ir.Node:
    first = group.layers[0]
    base = first.name
    dtype = group.activation.dtype or ir.DataType.FLOAT
    inverse = add_initializer(graph, f"{base}/smooth_inv_scale", (1.0 / scales).astype(dtype.numpy()))
    mul = ir.Node("", "Mul", [group.activation, inverse], name=f"{base}/SmoothMul")
    mul.outputs[0].name = f"{base}/SmoothMul_output_0"
    mul.outputs[0].dtype = dtype
    mul.outputs[0].shape = group.activation.shape
    graph.insert_before(first.node, mul)
    for layer in group.layers:
        layer.node.replace_input_with(0, mul.outputs[0])
    return mul
