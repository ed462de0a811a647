"""Fold 1/s into the output channels of a preceding linear layer.

If X = f(Z) with Z = A W (+ b) and f per-channel linear in Z (a Mul by another activation, an Add of
a per-channel constant), then X / s = f'(A (W / s) (+ b / s)) where the constants of f's Adds divide
too. Llama's MLP is the case that matters: down_proj reads up_proj(x) * SiLU(gate_proj(x)), so
down_proj's s folds into up_proj's output columns and the runtime graph gains no op.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from sqonnx.graph import constant, set_constant_input
from sqonnx.passes.smoothing_groups import LinearAbsorber
from sqonnx.smoothing import along


def fold_into_linear(graph: ir.Graph, absorber: LinearAbsorber, scales: np.ndarray) -> None:
    layer = absorber.layer
    set_constant_input(graph, layer.node, 1, layer.weight / along(scales, 1 - layer.in_axis), suffix="_smoothed")
    if layer.bias_value is not None:
        bias = constant(layer.bias_value)
        assert bias is not None
        set_constant_input(graph, layer.node, 2, bias / scales, suffix="_smoothed")
    for add, index in absorber.bias_adds:
        bias = constant(add.inputs[index])
        assert bias is not None
        set_constant_input(graph, add, index, bias / scales, suffix="_smoothed")
