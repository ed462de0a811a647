"""The smoothing pass: per group, compute s, scale the readers' weight rows by s, fold 1/s upstream.

The pass finds its groups on the model it is given (`find_smoothing_groups`) and needs only the
calibration statistics, keyed by value name. Groups are processed in reverse graph order: a group's
fold may divide the output columns of a layer that belongs to an earlier group (down_proj's s goes into
up_proj), and that earlier group must then see the weight as it will really be quantized when it takes
its per-row maxima.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from sqonnx.calibrators import ActivationStats
from sqonnx.config import Unabsorbed
from sqonnx.graph.tensors import SHARED, set_constant_input
from sqonnx.math.search import AlphaSearch, group_error
from sqonnx.math.smoothing import along, as_float32, group_weight_max, shared_scales
from sqonnx.passes.insert_smoothing_mul import insert_smoothing_mul
from sqonnx.passes.smoothing_groups import SmoothingGroup, find_smoothing_groups

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


@dataclass(frozen=True)
class SmoothSettings:
    """How groups are smoothed. `alpha_search` given: α is chosen per group (and `alpha` is unused). `scheme`: how
    the layers will be quantized, for `Unabsorbed.AUTO` to judge a group's error with and without smoothing on
    calibration rows (groups without rows are smoothed where an absorber takes 1/s)."""

    alpha: float = 0.5
    unabsorbed: Unabsorbed = Unabsorbed.SKIP
    alpha_search: AlphaSearch | None = None
    scheme: AlphaSearch | None = None


@dataclass
class SmoothPassResult(ir.passes.PassResult):
    """Each group's smoothing, in graph order."""

    groups: list[GroupResult] = field(default_factory=list)


@dataclass(frozen=True)
class _Choice:
    """A group's smoothing decided, not yet applied: s and α, or why it stays as it is (`reason`)."""

    scales: np.ndarray | None
    alpha: float | None = None
    reason: str = ""
    dead: tuple[int, int] = (0, 0)  # input channels zero on every sample, all-zero weight rows (s clamped there)


class SmoothPass(ir.passes.InPlacePass):
    """Apply SmoothQuant to every group that has at least one layer to quantize. Each group's choice
    (`choose_smoothing`) is made on the weights as the groups after it left them, then applied."""

    def __init__(self, stats: ActivationStats, quantized: set[str],
                 settings: SmoothSettings = SmoothSettings()) -> None:
        super().__init__()
        self.stats, self.quantized, self.settings = stats, quantized, settings

    def requires(self, model: ir.Model) -> None:
        """Every group whose smoothing is to be decided (a layer to quantize, and an absorber or a setting that may
        insert a Mul) has its input's channel maxima."""
        missing = [str(g.activation.name) for g in find_smoothing_groups(model.graph)
                   if any(layer.name in self.quantized for layer in g.layers)
                   and (g.absorber is not None or self.settings.unabsorbed is not Unabsorbed.SKIP)
                   and str(g.activation.name) not in self.stats.channel_max]
        if missing:
            raise ir.passes.PreconditionError(f"no calibration statistics for {', '.join(missing[:3])}")

    def call(self, model: ir.Model) -> SmoothPassResult:
        groups = find_smoothing_groups(model.graph)
        if SMOOTHED_KEY in model.metadata_props:
            return SmoothPassResult(model, False, [GroupResult(g, None, "", "not smoothed: the model is already "
                                                                         "smoothed") for g in groups])
        dead: list[tuple[str, int, int]] = []
        results = [self._smooth_group(model.graph, group, dead) for group in reversed(groups)]
        _summarize_dead_channels(dead[::-1])  # in graph order
        modified = any(r.scales is not None for r in results)
        if modified:
            model.metadata_props[SMOOTHED_KEY] = ("alpha=auto" if self.settings.alpha_search
                                                  else f"alpha={self.settings.alpha}")
        return SmoothPassResult(model, modified, results[::-1])

    def _smooth_group(self, graph: ir.Graph, group: SmoothingGroup, dead: list[tuple[str, int, int]]) -> GroupResult:
        choice = choose_smoothing(group, self.stats, self.quantized, self.settings)
        scales = choice.scales
        if scales is None:
            return GroupResult(group, None, "", choice.reason)
        if any(choice.dead):
            dead.append((group.layers[0].name, *choice.dead))
        _scale_weight_rows(graph, group, scales)
        absorber = group.absorber
        if absorber is not None:
            absorber.fold(graph, scales, self.stats)
            return GroupResult(group, scales, absorber.node.name or "", absorber.describe(), choice.alpha)
        mul = insert_smoothing_mul(graph, group, scales)
        logger.info("inserted %s: %s", mul.name, group.reason)
        return GroupResult(group, scales, mul.name or "", "explicit Mul", choice.alpha)


def choose_smoothing(group: SmoothingGroup, stats: ActivationStats, quantized: set[str],
                     settings: SmoothSettings) -> _Choice:
    """The one place a group's smoothing is decided: s and α, or why the group is left alone."""
    if not any(layer.name in quantized for layer in group.layers):
        return _Choice(None, reason="not smoothed: no layer of the group is quantized")
    absorber = group.absorber
    activation = str(group.activation.name)
    rows = stats.rows.get(activation)
    # Only a Mul that costs run time is judged: where an absorber takes 1/s for free, per-group errors
    # at a fixed α proved a poor guide (SmolLM2 O3 α 0.5: 17.0 judged, 16.67 always smoothed).
    judged = (absorber is None and settings.unabsorbed is Unabsorbed.AUTO and settings.scheme is not None
              and rows is not None)
    if absorber is None and (settings.unabsorbed is Unabsorbed.SKIP or (settings.unabsorbed is Unabsorbed.AUTO
                                                                        and not judged)):
        return _Choice(None, reason=f"not smoothed: {group.reason}")
    act_max = stats.channel_max[activation]
    if group.source is not None and not np.array_equal(stats.channel_max[str(group.source.name)], act_max):
        return _Choice(None, reason=f"not smoothed: the Reshape before it moves channels "
                                    f"({group.source.name} and the layer input differ per channel)")
    if absorber is not None:
        problem = absorber.check(act_max, stats)
        if problem:
            return _Choice(None, reason=f"not smoothed: {problem}")
    weights = [(layer.weight, layer.in_axis) for layer in group.layers]
    alpha: float | None = settings.alpha
    if settings.alpha_search is not None:
        alpha = settings.alpha_search.choose(activation, act_max, weights)
        if alpha is None:
            return _Choice(None, reason="not smoothed: no alpha beats no smoothing (alpha search)")
    if judged and alpha is not None:
        assert rows is not None and settings.scheme is not None
        rows32 = as_float32(rows)
        with_s = group_error(rows32, act_max, weights, alpha, settings.scheme)
        without = group_error(rows32, act_max, weights, None, settings.scheme)
        if with_s >= without * MUL_MUST_CUT:
            return _Choice(None, reason=f"not smoothed: {group.reason} (an explicit Mul would not pay: relative "
                                        f"error {with_s:.2g} smoothed vs {without:.2g} not on calibration rows)")
    assert alpha is not None  # a search that prefers no smoothing returned above
    shared = absorber.factor_map(stats) if absorber is not None else None
    weight_max = group_weight_max(weights)
    dead = int(np.count_nonzero(act_max == 0)), int(np.count_nonzero(weight_max == 0))
    return _Choice(shared_scales(act_max, weight_max, alpha, shared), alpha, dead=dead)


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
