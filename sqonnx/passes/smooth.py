"""The smoothing pass: per group, compute s, scale the readers' weight rows by s, fold 1/s upstream.

Groups are processed in reverse graph order. A group's fold may divide the output columns of a layer
that belongs to an earlier group (down_proj's s goes into up_proj), and that earlier group must then see
the weight as it will really be quantized when it takes its per-row maxima.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from sqonnx.config import Unabsorbed
from sqonnx.graph import set_constant_input
from sqonnx.passes.fold_into_linear import fold_into_linear
from sqonnx.passes.fold_into_mul import fold_into_mul
from sqonnx.passes.fold_into_norm import fold_into_norm
from sqonnx.passes.insert_smoothing_mul import insert_smoothing_mul
from sqonnx.passes.smoothing_groups import LinearAbsorber, MulAbsorber, NormAbsorber, SmoothingGroup, ValueAbsorber
from sqonnx.search import AlphaSearch
from sqonnx.smoothing import along, input_channel_max, smoothing_scales

logger = logging.getLogger(__name__)

SMOOTHED_KEY = "sqonnx.smoothed"


@dataclass
class GroupResult:
    """What happened to one group; feeds the report."""

    group: SmoothingGroup
    scales: np.ndarray | None  # None: not smoothed
    folded_into: str  # name of the node that absorbed 1/s ("" when none)
    method: str  # how: a producer kind, "explicit Mul", or "not smoothed: <why>"
    alpha: float | None = None


class SmoothPass(ir.passes.InPlacePass):
    """Apply SmoothQuant to every group that has at least one layer to quantize."""

    def __init__(self, groups: list[SmoothingGroup], channel_max: dict[str, np.ndarray], alpha: float,
                 unabsorbed: Unabsorbed, quantized: set[str], alpha_search: AlphaSearch | None = None) -> None:
        """`alpha_search` given: α is chosen per group (and `alpha` is unused)."""
        super().__init__()
        self.alpha_search = alpha_search
        self.groups = groups
        self.channel_max = channel_max
        self.alpha = alpha
        self.unabsorbed = unabsorbed
        self.quantized = quantized
        self.results: list[GroupResult] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if SMOOTHED_KEY in model.metadata_props:
            return ir.passes.PassResult(model, modified=False)
        graph = model.graph
        results = []
        for group in reversed(self.groups):
            results.append(self._smooth_group(graph, group))
        self.results = list(reversed(results))
        modified = any(r.scales is not None for r in self.results)
        if modified:
            model.metadata_props[SMOOTHED_KEY] = "alpha=auto" if self.alpha_search else f"alpha={self.alpha}"
        return ir.passes.PassResult(model, modified=modified)

    def _smooth_group(self, graph: ir.Graph, group: SmoothingGroup) -> GroupResult:
        if not any(layer.name in self.quantized for layer in group.layers):
            return GroupResult(group, None, "", "not smoothed: no layer of the group is quantized")
        absorber = group.absorber
        if absorber is None and self.unabsorbed is Unabsorbed.SKIP:
            return GroupResult(group, None, "", f"not smoothed: {group.reason}")
        act_max = self.channel_max[str(group.activation.name)]
        weight_max = np.max([input_channel_max(layer.weight, layer.in_axis) for layer in group.layers], axis=0)
        if isinstance(absorber, ValueAbsorber):
            problem = _value_fold_problem(absorber, act_max, self.channel_max.get(str(absorber.values.name)))
            if problem:
                return GroupResult(group, None, "", f"not smoothed: {problem}")
        alpha: float | None = self.alpha
        if self.alpha_search is not None:
            alpha = self.alpha_search.choose(str(group.activation.name), act_max,
                                             [(layer.weight, layer.in_axis) for layer in group.layers])
            if alpha is None:
                return GroupResult(group, None, "", "not smoothed: no alpha beats no smoothing (alpha search)")
        if isinstance(absorber, ValueAbsorber):
            # Query heads that read one KV head share its s: take maxima over them, per value channel.
            shared = np.zeros(absorber.value_channels, np.float32)
            shared_w = np.zeros(absorber.value_channels, np.float32)
            np.maximum.at(shared, absorber.channel_map, act_max)
            np.maximum.at(shared_w, absorber.channel_map, weight_max)
            value_scales = smoothing_scales(shared, shared_w, alpha)
            scales = value_scales[absorber.channel_map]
        else:
            scales = smoothing_scales(act_max, weight_max, alpha)
        _warn_about_dead_channels(group, act_max, weight_max)
        _scale_weight_rows(graph, group, scales)
        if isinstance(absorber, NormAbsorber):
            fold_into_norm(graph, absorber, scales)
            return GroupResult(group, scales, absorber.node.name or "", absorber.node.op_type, alpha)
        if isinstance(absorber, MulAbsorber):
            fold_into_mul(graph, absorber, scales)
            return GroupResult(group, scales, absorber.node.name or "", "Mul (per-channel weight)", alpha)
        if isinstance(absorber, ValueAbsorber):
            fold_into_linear(graph, LinearAbsorber(absorber.layer, absorber.bias_adds), value_scales)
            return GroupResult(group, scales, absorber.layer.name, f"{absorber.node.op_type} (value channels)", alpha)
        if isinstance(absorber, LinearAbsorber):
            fold_into_linear(graph, absorber, scales)
            return GroupResult(group, scales, absorber.layer.name, f"{absorber.node.op_type} (output columns)", alpha)
        mul = insert_smoothing_mul(graph, group, scales)
        logger.info("inserted %s: %s", mul.name, group.reason)
        return GroupResult(group, scales, mul.name or "", "explicit Mul", alpha)


def _scale_weight_rows(graph: ir.Graph, group: SmoothingGroup, scales: np.ndarray) -> None:
    """W_j *= s_j for every reader. A weight tied between readers of this group only is scaled once,
    in place, and stays tied; one also read elsewhere gets a copy per reader (set_constant_input)."""
    group_nodes = {id(layer.node): layer for layer in group.layers}
    scaled_in_place: set[int] = set()
    for layer in group.layers:
        value = layer.weight_value
        if id(value) in scaled_in_place:
            continue
        scaled = layer.weight * along(scales, layer.in_axis)
        tied_only_here = len(value.uses()) > 1 and not value.is_graph_output() and all(
            use.idx == 1 and id(use.node) in group_nodes and group_nodes[id(use.node)].in_axis == layer.in_axis
            for use in value.uses())
        if tied_only_here:
            value.const_value = ir.tensor(scaled.astype(np.float32), name=value.name)
            scaled_in_place.add(id(value))
        else:
            set_constant_input(graph, layer.node, 1, scaled, suffix="_smoothed")


def _value_fold_problem(absorber: ValueAbsorber, act_max: np.ndarray, value_max: np.ndarray | None) -> str:
    """Check the channel map against calibration: attention probabilities are >= 0 and sum to 1, so
    |output channel c| can never exceed max |value channel map[c]|. A violated bound means the graph is
    not the attention the map assumes (a head layout we did not expect), and the fold would be wrong."""
    if value_max is None:
        return "no calibration statistics for the value projection"
    bound = value_max[absorber.channel_map] * (1 + 1e-3) + 1e-6
    violated = int(np.count_nonzero(act_max > bound))
    if violated:
        return (f"{violated} channels exceed the value channels they should mix ({absorber.layer.name}); "
                "the attention layout is not the expected one")
    return ""


def _warn_about_dead_channels(group: SmoothingGroup, act_max: np.ndarray, weight_max: np.ndarray) -> None:
    dead_inputs = int(np.count_nonzero(act_max == 0))
    dead_rows = int(np.count_nonzero(weight_max == 0))
    if dead_inputs or dead_rows:
        logger.warning("%s: %d input channels were zero on every calibration sample and %d weight rows are all "
                       "zero; their smoothing factors were clamped (the fold stays exact)",
                       group.layers[0].name, dead_inputs, dead_rows)
