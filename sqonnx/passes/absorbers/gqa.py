"""Fold an attention output projection's 1/s into the value columns behind onnxruntime's GroupQueryAttention.

onnxruntime-genai's model builder (and onnxruntime's transformer optimizer) write attention as one
`com.microsoft` GroupQueryAttention node: o_proj reads its output, [batch, seq, num_heads * head_size].
Output channel c = h * head_size + d (query head h, dim d) is softmax(q_h K_g^T) V_g[:, d], a token mix of
value head g = h // (num_heads / kv_num_heads), dim d: probabilities are >= 0 and sum to at most 1 (a head
sink only lowers the sum), and RoPE (do_rotary) turns q and k, never v. So

    GQA(q, k, v / s_v)[.., c] = GQA(q, k, v)[.., c] / s_v[g * head_size + d]

exactly, and o_proj's 1/s folds into the value projection's output columns, with the query heads that read
one value head sharing its factor. The value is the `value` input (a separate v_proj), or, when key and value
are absent, the last kv_num_heads * head_size columns of the packed `query` input (q | k | v, the builder's
qkv_proj). Unlike `value.py` the channel map is not measured by a probe: it follows from the node's
attributes (a probe still measures moves between the projection and the node's input, if any). The cache
output present_value then holds V / s too; it comes back as past_value in the same space, so a decode step
stays exact. Calibration still bounds the map: |output channel c| <= max |value channel behind c|.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from sqonnx.calibrators import ActivationStats
from sqonnx.graph.match import Match, NoMatch
from sqonnx.passes.absorbers.base import Site, value_uses
from sqonnx.passes.absorbers.columns import ColumnAbsorber, walk_to_linear

DOMAIN = "com.microsoft"
# Attributes that change only how the probabilities are made (scale, softcap, window, RoPE on q and k) or what
# else comes out; any other (a quantized KV cache: k_quant_type / v_quant_type) may touch V, so it is refused.
KNOWN_ATTRIBUTES = frozenset({"num_heads", "kv_num_heads", "scale", "softcap", "local_window_size", "do_rotary",
                              "rotary_interleaved", "smooth_softmax", "qk_output"})
QUERY, KEY, VALUE = 0, 1, 2


@dataclass(frozen=True)
class GroupQueryAttentionAbsorber(ColumnAbsorber):
    """`target`/`channels`: the node's input that carries V (the packed query when key and value are absent)
    and its width, where the path's probe (if any) measures the layer's columns."""

    attention: ir.Node
    offset: int  # where V starts in `target` (after q | k when packed)
    head_size: int
    group: int  # query heads per value head
    x_channels: int  # channels of X, the attention output

    @classmethod
    def match(cls, site: Site) -> Match[GroupQueryAttentionAbsorber]:
        node = site.producer
        if node is None or node.op_type != "GroupQueryAttention" or node.domain != DOMAIN:
            return NoMatch("")
        name = node.name or node.op_type
        if site.source is not node.outputs[0]:
            return NoMatch(f"the activation is not {name}'s attention output")
        heads, kv_heads = node.attributes.get_int("num_heads", 0), node.attributes.get_int("kv_num_heads", 0)
        if heads <= 0 or kv_heads <= 0 or heads % kv_heads or site.channels % heads:
            return NoMatch(f"{name}'s heads (num_heads {heads}, kv_num_heads {kv_heads}) do not divide "
                           f"its {site.channels} output channels")
        unknown = sorted(set(node.attributes) - KNOWN_ATTRIBUTES)
        if unknown:
            return NoMatch(f"{name} has attributes {', '.join(unknown)} that may change the value path")
        head_size = site.channels // heads
        inputs = list(node.inputs)
        key = inputs[KEY] if len(inputs) > KEY else None
        value = inputs[VALUE] if len(inputs) > VALUE else None
        if value is not None:
            offset, width = 0, kv_heads * head_size
        elif key is None and inputs and inputs[QUERY] is not None:
            value = inputs[QUERY]  # packed q | k | v
            offset, width = (heads + kv_heads) * head_size, (heads + 2 * kv_heads) * head_size
        else:
            return NoMatch(f"{name} reads a key but no value input")
        assert value is not None
        readers = value_uses(value)
        if value.is_graph_output() or len(readers) != 1:
            return NoMatch(f"{name}'s value input {value.name} is also read elsewhere")
        path = walk_to_linear(value, width, attention=False)
        if path is None:
            return NoMatch(f"{name}'s value input {value.name} does not come from a linear layer's output columns")
        return cls(path, value, width, node, offset, head_size, heads // kv_heads, site.channels)

    def channel_statistics(self) -> dict[str, int]:
        return self.value_statistics()

    @property
    def value_channels(self) -> np.ndarray:
        """The channel of the value input behind each channel of X: query head h reads value head h // group."""
        channel = np.arange(self.x_channels)
        return self.offset + (channel // self.head_size // self.group) * self.head_size + channel % self.head_size

    def columns(self, stats: ActivationStats) -> np.ndarray | None:
        of_value = self.path.column_map(self.target, self.channels, stats)
        return None if of_value is None else of_value[self.value_channels]

    def check(self, act_max: np.ndarray, stats: ActivationStats) -> str:
        return self.bound_problem(act_max, stats, self.attention.name or "GroupQueryAttention")

    def fold(self, graph: ir.Graph, scales: np.ndarray, stats: ActivationStats) -> None:
        """The path runs from the layer to the value input, so its factors are per value channel: query heads
        of one group carry the same factor (factor_map), so the assignment is unambiguous."""
        of_value = self.path.column_map(self.target, self.channels, stats)
        assert of_value is not None
        factors = np.ones(self.channels, np.float64)
        factors[self.value_channels] = scales
        self.path.fold(graph, factors, of_value)

    def describe(self) -> str:
        return f"{self.node.op_type} (value columns)"
