"""Fold 1/s into a normalization's affine parameters.

LayerNorm(x) = n(x) * gamma + beta, so LayerNorm(x) / s = n(x) * (gamma / s) + (beta / s): both the
scale and the bias divide (forgetting beta breaks BERT). The same holds for RMSNorm-style
SimplifiedLayerNormalization and for the Skip* variants, whose first output is the normalized value
(their residual-sum output does not depend on gamma).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from sqonnx.graph import constant, set_constant_input
from sqonnx.passes.smoothing_groups import NormAbsorber


def fold_into_norm(graph: ir.Graph, absorber: NormAbsorber, scales: np.ndarray) -> None:
    node = absorber.node
    for index in (absorber.scale_index, absorber.bias_index):
        if index is None:
            continue
        array = constant(node.inputs[index])
        assert array is not None
        set_constant_input(graph, node, index, array / scales, suffix="_smoothed")
