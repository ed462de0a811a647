"""Fold an attention output projection's 1/s into the value columns behind it.

o_proj (BERT's attention output dense, OPT's out_proj, GPT-2's c_proj, BLOOM's and Falcon's dense) reads
softmax(Q K^T) V per head, moved around by Reshape/Transpose (and Expand for grouped- and multi-query
attention, Concat with the key/value cache). Each of its channels is a mix over tokens of one value
channel, so 1/s folds into the value projection's output columns: a separate v_proj (with or without
bias), or the value columns of a fused qkv_proj / query_key_value / c_attn. Query heads that read one
value head share its factor. Which value column feeds which channel is measured during calibration
(a labelled replay of the moves) and checked against calibration maxima: attention probabilities are
>= 0 and sum to 1, so |output channel c| can never exceed max |value column map[c]|.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx_ir as ir

from sqonnx.calibrators import ActivationStats
from sqonnx.passes.absorbers._columns import ColumnPath, walk_to_linear
from sqonnx.passes.absorbers.base import Absorber, Probe, Site


@dataclass(frozen=True)
class ValueAbsorber(Absorber):
    path: ColumnPath
    target: ir.Value
    channels: int
    kind: ClassVar[str] = "value"

    @classmethod
    def match(cls, site: Site) -> ValueAbsorber | str:
        if site.producer is None:
            return ""
        # From X itself: the Reshape that joins the heads is one of the moves the probe replays.
        path = walk_to_linear(site.activation, site.channels, attention=True)
        return "" if path is None else cls(path, site.activation, site.channels)

    @property
    def node(self) -> ir.Node:
        return self.path.layer.node

    @property
    def layer_name(self) -> str:
        return self.path.layer.name

    def channel_statistics(self) -> dict[str, int]:
        return {str(self.path.values.name): self.path.out_columns}

    def probe(self) -> Probe | None:
        return self.path.probe(self.target, self.channels)

    def factor_map(self, stats: ActivationStats) -> np.ndarray | None:
        return self.path.column_map(self.target, self.channels, stats)

    def check(self, act_max: np.ndarray, stats: ActivationStats) -> str:
        columns = self.path.column_map(self.target, self.channels, stats)
        if columns is None:
            return f"the value columns of {self.layer_name} behind the attention output could not be measured"
        value_max = stats.channel_max.get(str(self.path.values.name))
        if value_max is None:
            return "no calibration statistics for the value projection"
        bound = value_max[columns] * (1 + 1e-3) + 1e-6
        violated = int(np.count_nonzero(act_max > bound))
        if violated:
            return (f"{violated} channels exceed the value channels they should mix ({self.layer_name}); "
                    "the attention layout is not the expected one")
        return ""

    def fold(self, graph: ir.Graph, scales: np.ndarray, stats: ActivationStats) -> None:
        columns = self.path.column_map(self.target, self.channels, stats)
        assert columns is not None
        self.path.fold(graph, scales, columns)

    def describe(self) -> str:
        return f"{self.node.op_type} (value columns)"
