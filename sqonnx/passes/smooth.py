"""The smoothing pass: per group, compute s, scale the readers' weight rows by s, fold 1/s upstream.

The pass finds its groups on the model it is given (`find_smoothing_groups`) and needs only the
calibration statistics, keyed by value name. Groups are processed in reverse graph order: a group's
fold may divide the output columns of a layer that belongs to an earlier group (down_proj's s goes into
up_proj), and that earlier group must then see the weight as it will really be quantized when it takes
its per-row maxima.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from sqonnx.calibrators import ActivationStats, Sample, collect_statistics
from sqonnx.config import Unabsorbed
from sqonnx.graph.layers import find_linear_layers
from sqonnx.graph.tensors import SHARED, set_constant_input
from sqonnx.math.search import AlphaSearch, group_error
from sqonnx.math.smoothing import along, as_float32, input_channel_max, shared_scales
from sqonnx.passes.insert_smoothing_mul import insert_smoothing_mul
from sqonnx.passes.smoothing_groups import SmoothingGroup, find_smoothing_groups, statistics_needed

logger = logging.getLogger(__name__)

SMOOTHED_KEY = "sqonnx.smoothed"
# Under Unabsorbed.AUTO an explicit Mul (one more op at run time) must cut the group's error by this much.
MUL_MUST_CUT = 0.8


@dataclass
class GroupResult:
    """What happened to one group; feeds the report."""

    group: SmoothingGroup
    scales: np.ndarray | None  # None: not smoothed
    folded_into: str  # name of the node that absorbed 1/s ("" when none)
    method: str  # how: an absorber's description, "explicit Mul", or "not smoothed: <why>"
    alpha: float | None = None


class SmoothPass(ir.passes.InPlacePass):
    """Apply SmoothQuant to every group that has at least one layer to quantize."""

    def __init__(self, stats: ActivationStats, quantized: set[str], alpha: float,
                 unabsorbed: Unabsorbed = Unabsorbed.SKIP, alpha_search: AlphaSearch | None = None,
                 scheme: AlphaSearch | None = None) -> None:
        """`alpha_search` given: α is chosen per group (and `alpha` is unused). `scheme`: how layers will be
        quantized, for `Unabsorbed.AUTO` to judge a group's error with and without smoothing on
        calibration rows (groups without rows are smoothed where an absorber takes 1/s)."""
        super().__init__()
        self.scheme = scheme
        self.stats = stats
        self.quantized = quantized
        self.alpha = alpha
        self.unabsorbed = unabsorbed
        self.alpha_search = alpha_search
        self.results: list[GroupResult] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        groups = find_smoothing_groups(model.graph)
        if SMOOTHED_KEY in model.metadata_props:
            self.results = [GroupResult(g, None, "", "not smoothed: the model is already smoothed") for g in groups]
            return ir.passes.PassResult(model, modified=False)
        dead: list[tuple[str, int, int]] = []
        results = [self._smooth_group(model.graph, group, dead) for group in reversed(groups)]
        self.results = list(reversed(results))
        _summarize_dead_channels(dead[::-1])  # in graph order
        modified = any(r.scales is not None for r in self.results)
        if modified:
            model.metadata_props[SMOOTHED_KEY] = "alpha=auto" if self.alpha_search else f"alpha={self.alpha}"
        return ir.passes.PassResult(model, modified=modified)

    def _smooth_group(self, graph: ir.Graph, group: SmoothingGroup, dead: list[tuple[str, int, int]]) -> GroupResult:
        if not any(layer.name in self.quantized for layer in group.layers):
            return GroupResult(group, None, "", "not smoothed: no layer of the group is quantized")
        absorber = group.absorber
        rows = self.stats.rows.get(str(group.activation.name))
        # Only a Mul that costs run time is judged: where an absorber takes 1/s for free, per-group errors
        # at a fixed α proved a poor guide (SmolLM2 O3 α 0.5: 17.0 judged, 16.67 always smoothed).
        judged = (absorber is None and self.unabsorbed is Unabsorbed.AUTO and self.scheme is not None
                  and rows is not None)
        if absorber is None and (self.unabsorbed is Unabsorbed.SKIP or (self.unabsorbed is Unabsorbed.AUTO
                                                                          and not judged)):
            return GroupResult(group, None, "", f"not smoothed: {group.reason}")
        act_max = self.stats.channel_max[str(group.activation.name)]
        weight_max = np.max([input_channel_max(layer.weight, layer.in_axis) for layer in group.layers], axis=0)
        if group.source is not None and not np.array_equal(self.stats.channel_max[str(group.source.name)], act_max):
            return GroupResult(group, None, "", f"not smoothed: the Reshape before it moves channels "
                                                f"({group.source.name} and the layer input differ per channel)")
        if absorber is not None:
            problem = absorber.check(act_max, self.stats)
            if problem:
                return GroupResult(group, None, "", f"not smoothed: {problem}")
        alpha: float | None = self.alpha
        if self.alpha_search is not None:
            alpha = self.alpha_search.choose(str(group.activation.name), act_max,
                                             [(layer.weight, layer.in_axis) for layer in group.layers])
            if alpha is None:
                return GroupResult(group, None, "", "not smoothed: no alpha beats no smoothing (alpha search)")
        if judged and alpha is not None:
            assert rows is not None and self.scheme is not None
            weights = [(layer.weight, layer.in_axis) for layer in group.layers]
            rows32 = as_float32(rows)
            with_s = group_error(rows32, act_max, weights, alpha, self.scheme)
            without = group_error(rows32, act_max, weights, None, self.scheme)
            if with_s >= without * MUL_MUST_CUT:
                return GroupResult(group, None, "", f"not smoothed: {group.reason} (an explicit Mul would not pay: "
                                                    f"relative error {with_s:.2g} smoothed vs {without:.2g} not "
                                                    "on calibration rows)")
        shared = absorber.factor_map(self.stats) if absorber is not None else None
        assert alpha is not None  # a search that prefers no smoothing returned above
        scales = shared_scales(act_max, weight_max, alpha, shared)
        dead_inputs, dead_rows = int(np.count_nonzero(act_max == 0)), int(np.count_nonzero(weight_max == 0))
        if dead_inputs or dead_rows:
            dead.append((group.layers[0].name, dead_inputs, dead_rows))
        _scale_weight_rows(graph, group, scales)
        if absorber is not None:
            absorber.fold(graph, scales, self.stats)
            return GroupResult(group, scales, absorber.node.name or "", absorber.describe(), alpha)
        mul = insert_smoothing_mul(graph, group, scales)
        logger.info("inserted %s: %s", mul.name, group.reason)
        return GroupResult(group, scales, mul.name or "", "explicit Mul", alpha)


def smoothing_statistics(model: ir.Model, feeds: Iterable[Sample], total: int,
                         quantized: set[str] | None = None, keep_rows: int = 0,
                         progress: bool = False) -> ActivationStats:
    """Calibrate `model` for SmoothPass: every statistic its groups' absorbers ask for (all layers quantized
    unless `quantized` names them)."""
    if quantized is None:
        quantized = {layer.name for layer in find_linear_layers(model.graph)}
    request = statistics_needed(find_smoothing_groups(model.graph), quantized)
    return collect_statistics(model, request.channel_max, feeds, total, progress=progress, keep_rows=keep_rows,
                              probes=request.probes)


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
        tied_only_here = len(value.uses()) > 1 and not value.is_graph_output() and not value.meta.get(SHARED) and all(
            use.idx == 1 and id(use.node) in group_nodes and group_nodes[id(use.node)].in_axis == layer.in_axis
            for use in value.uses())
        if tied_only_here:
            value.const_value = ir.tensor(scaled.astype(layer.weight.dtype), name=value.name)
            scaled_in_place.add(id(value))
        else:
            set_constant_input(graph, layer.node, 1, scaled, suffix="_smoothed")


def _summarize_dead_channels(dead: list[tuple[str, int, int]]) -> None:
    """One warning for all groups with channels that never fired (Gemma-3 had 18 near-identical lines)."""
    if not dead:
        return
    inputs, rows = sum(d[1] for d in dead), sum(d[2] for d in dead)
    names = ", ".join(d[0] for d in dead[:3]) + (f" and {len(dead) - 3} more" if len(dead) > 3 else "")
    logger.warning("%d layer groups (%s) have %d input channels that were zero on every calibration sample and "
                   "%d all-zero weight rows; their smoothing factors were clamped (the folds stay exact)",
                   len(dead), names, inputs, rows)
