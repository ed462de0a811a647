"""Fold 1/s into a Mul by a per-channel constant.

optimum exports Llama's RMSNorm as Pow -> ReduceMean -> Add -> Sqrt -> Div -> Mul(weight); the last Mul
is the only place the norm's weight lives, so (x * w) / s = x * (w / s).

A Mul by a scalar would absorb exactly too, but the one exports have in front of linear layers is the
0.5 that ends an exported GELU: smoothing a GELU FFN's output layer there moved MiniLM's outlier into a
weight row that already had one (cosine 0.90 instead of 0.98), so it is not taken as an absorber; the
group is judged like any other without one (`--unabsorbed`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from sqonnx.calibrators import ActivationStats
from sqonnx.graph.match import Match, NoMatch, is_standard
from sqonnx.graph.tensors import constant, set_constant_input
from sqonnx.passes.absorbers.base import Absorber, Site, is_channel_vector


@dataclass(frozen=True)
class MulAbsorber(Absorber):
    mul: ir.Node
    const_index: int

    @classmethod
    def match(cls, site: Site) -> Match[MulAbsorber]:
        producer = site.producer
        if producer is None or not is_standard(producer, "Mul"):
            return NoMatch("")
        for index in (1, 0):
            if is_channel_vector(producer, index, site.channels):
                return cls(producer, index)
        return NoMatch("")

    @property
    def node(self) -> ir.Node:
        return self.mul

    def fold(self, graph: ir.Graph, scales: np.ndarray, stats: ActivationStats) -> None:
        array = constant(self.mul.inputs[self.const_index])
        assert array is not None
        shape = (*array.shape[:-1], scales.shape[0]) if array.ndim else scales.shape
        set_constant_input(graph, self.mul, self.const_index, np.broadcast_to(array, shape) / scales,
                           suffix="_smoothed")

    def describe(self) -> str:
        return "Mul (per-channel weight)"
