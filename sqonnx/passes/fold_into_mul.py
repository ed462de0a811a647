"""Fold 1/s into a Mul by a per-channel constant.

optimum exports Llama's RMSNorm as Pow -> ReduceMean -> Add -> Sqrt -> Div -> Mul(weight); the last Mul
is the only place the norm's weight lives, so (x * w) / s = x * (w / s). A scalar constant becomes a
per-channel vector, which broadcasts to the same output shape.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from sqonnx.graph import constant, set_constant_input
from sqonnx.passes.smoothing_groups import MulAbsorber


def fold_into_mul(graph: ir.Graph, absorber: MulAbsorber, scales: np.ndarray) -> None:
    node = absorber.node
    array = constant(node.inputs[absorber.const_index])
    assert array is not None
    shape = (*array.shape[:-1], scales.shape[0]) if array.ndim else scales.shape
    folded = np.broadcast_to(array, shape) / scales
    set_constant_input(graph, node, absorber.const_index, folded, suffix="_smoothed")
