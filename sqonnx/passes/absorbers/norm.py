"""Fold 1/s into a normalization's affine parameters.

LayerNorm(x) = n(x) * gamma + beta, so LayerNorm(x) / s = n(x) * (gamma / s) + (beta / s): both the
scale and the bias divide (forgetting beta breaks BERT, OPT, BLOOM, Falcon, NeoX, Phi). The same holds
for RMSNorm-style SimplifiedLayerNormalization and the Skip* variants onnxruntime's optimizer fuses,
whose first output is the normalized value (their residual-sum output does not depend on gamma).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from sqonnx.calibrators import ActivationStats
from sqonnx.graph.match import Match, NoMatch
from sqonnx.graph.tensors import constant, set_constant_input
from sqonnx.passes.absorbers.base import Absorber, Site, is_channel_vector


@dataclass(frozen=True)
class FusedNorm:
    """Where a normalization in one node (ONNX's, or one onnxruntime fuses) keeps its parameters; output 0
    is the normalized value. One table for the passes that read them: this absorber divides gamma and beta, the
    rotation (passes/rotate.py) folds gamma of the RMSNorms and refuses the others."""

    scale: int  # input index of gamma
    bias: int | None  # input index of beta, added after normalizing (a Skip* op's own bias is added before)
    rms: bool  # x / rms(x), no mean subtracted: it commutes with an orthogonal rotation, a LayerNorm does not
    statistics: tuple[int, ...]  # outputs with the mean / inverse std, which a rotation would change


FUSED_NORMS: dict[str, FusedNorm] = {
    "LayerNormalization": FusedNorm(1, 2, rms=False, statistics=(1, 2)),
    "SimplifiedLayerNormalization": FusedNorm(1, None, rms=True, statistics=(1,)),
    "SkipLayerNormalization": FusedNorm(2, 3, rms=False, statistics=(1, 2)),
    "SkipSimplifiedLayerNormalization": FusedNorm(2, None, rms=True, statistics=(1, 2)),
}


@dataclass(frozen=True)
class NormAbsorber(Absorber):
    norm: ir.Node
    scale_index: int
    bias_index: int | None

    @classmethod
    def match(cls, site: Site) -> Match[NormAbsorber]:
        producer = site.producer
        if producer is None or producer.op_type not in FUSED_NORMS or site.source is not producer.outputs[0]:
            return NoMatch("")
        params = FUSED_NORMS[producer.op_type]
        scale_index, bias_index = params.scale, params.bias
        axis = producer.attributes.get_int("axis", -1)
        shape = site.source.shape
        if axis != -1 and (shape is None or axis != len(shape) - 1):
            return NoMatch(f"{producer.name} normalizes over axis {axis}, not the channel axis")
        if not is_channel_vector(producer, scale_index, site.channels):
            return NoMatch(f"{producer.name} has no constant per-channel scale")
        if bias_index is not None and (bias_index >= len(producer.inputs) or producer.inputs[bias_index] is None):
            bias_index = None
        if bias_index is not None and not is_channel_vector(producer, bias_index, site.channels):
            return NoMatch(f"{producer.name} has a bias that is not a constant per-channel vector")
        return cls(producer, scale_index, bias_index)

    @property
    def node(self) -> ir.Node:
        return self.norm

    def fold(self, graph: ir.Graph, scales: np.ndarray, stats: ActivationStats) -> None:
        for index in (self.scale_index, self.bias_index):
            if index is not None:
                array = constant(self.norm.inputs[index])
                assert array is not None
                set_constant_input(graph, self.norm, index, array / scales, suffix="_smoothed")

    def describe(self) -> str:
        return self.norm.op_type
