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

import numpy as np

from sqonnx.calibrators import ActivationStats
from sqonnx.graph.match import Match, NoMatch
from sqonnx.passes.absorbers.base import Site
from sqonnx.passes.absorbers.columns import ColumnAbsorber, walk_to_linear


@dataclass(frozen=True)
class ValueAbsorber(ColumnAbsorber):
    """The value columns behind an attention output projection (module docstring)."""

    @classmethod
    def match(cls, site: Site) -> Match[ValueAbsorber]:
        if site.producer is None:
            return NoMatch("")
        # From X itself: the Reshape that joins the heads is one of the moves the probe replays.
        path = walk_to_linear(site.activation, site.channels, attention=True)
        return NoMatch("") if path is None else cls(path, site.activation, site.channels)

    def channel_statistics(self) -> dict[str, int]:
        return self.value_statistics()

    def check(self, act_max: np.ndarray, stats: ActivationStats) -> str:
        return self.bound_problem(act_max, stats, "the attention output")

    def describe(self) -> str:
        return f"{self.node.op_type} (value columns)"
