"""Outlier channel splitting (Zhao et al., ICML 2019) for per-tensor static activations: a channel far above the
rest, even after smoothing, is read k times at 1/k of its value.

SmolLM2's massive activations (Sun et al. 2024) sit in one or two channels of two down_proj inputs, on the first
tokens only: 3065 against a median channel maximum of 1.2. Smoothing at α 0.5 leaves them 40 times the median, and
one static range for the whole tensor then spends all but a few of its 255 steps on values that two tokens reach:
those two layers cost `--alpha 0.5 --static` 8 of its 14 points of perplexity (issue 27). Splitting is exact in real
arithmetic and keeps every layer static INT8:

    X W = sum_j X_j W_j = sum_j sum_{c < k_j} (X_j / k_j) W_j

so X'' = Gather(X, copies) * (1 / k) feeds the layers, each weight gets a row per copy (the row itself, not divided:
the weight's range is what it was), and the tensor's range falls to the largest channel left whole. The graph gains a
Gather and a Mul on that activation (elementwise, before its QuantizeLinear); the MatMul reads sum(k_j - 1) more
channels (SPLIT_MAX_SHARE of them at most). Only where every layer is static (--static): --level auto reads such
groups per token instead, and W4A8's kernel quantizes its input per block itself.

The statistics follow the split (the new activation's maxima, rows and X^T X are the old ones gathered, its
smoothing factor s_c k_c), so planning and insertion see an ordinary group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
import onnx_ir as ir

from sqonnx.calibrators import ActivationStats
from sqonnx.graph.tensors import constant
from sqonnx.passes.smooth import GroupResult
from sqonnx.passes.smoothing_groups import SmoothingGroup

# A group is split where its largest smoothed channel is SPLIT_FROM times the largest left once at most
# SPLIT_CHANNELS channels are split; each split channel into ceil(max / that) copies, at most SPLIT_MAX_SHARE of
# the group's channels added in all.
SPLIT_FROM = 2.0
SPLIT_CHANNELS = 4
SPLIT_MAX_SHARE = 1 / 16


@dataclass(frozen=True)
class Split:
    """Which channel each of the new activation's channels reads, and by how much it is divided."""

    source: np.ndarray  # [C''] channel of X
    copies: np.ndarray  # [C''] k of that channel

    @property
    def added(self) -> int:
        return len(self.source) - int(self.source.max()) - 1


def plan_split(smoothed_max: np.ndarray) -> Split | None:
    """The split of a group whose smoothed channel maxima are `smoothed_max`; None where none pays."""
    order = np.argsort(-smoothed_max, kind="stable")
    channels = len(smoothed_max)
    budget = max(0, int(channels * SPLIT_MAX_SHARE))
    best: tuple[float, np.ndarray] | None = None
    for count in range(1, min(SPLIT_CHANNELS, channels - 1) + 1):
        top = smoothed_max[order[:count]].astype(np.float64)
        # down to the next channel, or as far as the budget goes (sum ceil(m / t) <= sum m / t + count)
        target = max(float(smoothed_max[order[count]]), float(top.sum()) / budget if budget else math.inf)
        if not 0 < target < math.inf:
            break
        copies = np.ones(channels, np.int64)
        copies[order[:count]] = np.ceil(top / target).astype(np.int64)
        reached = float(np.max(smoothed_max / copies))
        if best is None or reached < best[0]:
            best = (reached, copies)
    if best is None or float(smoothed_max.max()) < SPLIT_FROM * best[0]:
        return None
    copies = best[1]
    source = np.concatenate([np.arange(channels), *(np.full(k - 1, j) for j, k in enumerate(copies) if k > 1)])
    return Split(source.astype(np.int64), copies[source])


@dataclass
class SplitResult(ir.passes.PassResult):
    """The groups as planning is to see them (split ones with their new activation) and the statistics with the new
    activations' entries."""

    groups: list[GroupResult] = field(default_factory=list)
    stats: ActivationStats | None = None


class SplitChannelsPass(ir.passes.InPlacePass):
    """Split the outlier channels of the smoothed groups given (every layer of which is quantized, static, MatMul
    with an [in, out] weight read by it alone)."""

    def __init__(self, groups: list[GroupResult], stats: ActivationStats, quantized: set[str],
                 skip: frozenset[str] = frozenset(), half: tuple[ir.DataType, ...] = ()) -> None:
        super().__init__()
        self.groups, self.stats, self.quantized, self.skip = groups, stats, quantized, skip
        self.half = half  # half types the layers are quantized in as they are (no float islands; see targets.rules)

    def call(self, model: ir.Model) -> SplitResult:
        stats = ActivationStats(dict(self.stats.channel_max), dict(self.stats.rows), dict(self.stats.maps),
                                dict(self.stats.hessians))
        out: list[GroupResult] = []
        for result in self.groups:
            group = result.group
            name = str(group.activation.name)
            act_max = stats.channel_max.get(name)
            split = None
            if act_max is not None and result.scales is not None and name not in self.skip and _splittable(
                    group, self.quantized, self.half):
                split = plan_split(act_max / result.scales)
            if split is None:
                out.append(result)
                continue
            out.append(_apply(model.graph, result, split, stats))
        return SplitResult(model, any(r is not g for r, g in zip(out, self.groups, strict=True)), out, stats)


def _splittable(group: SmoothingGroup, quantized: set[str], half: tuple[ir.DataType, ...]) -> bool:
    # float32, or a half type the target quantizes in (a MatMul's two inputs share their type: the weight's says the
    # activation's where the graph leaves it unknown); half-precision layers in float32 islands are left as they are
    read = group.layers[0].activation
    return group.activation.dtype in (ir.DataType.FLOAT, None, *half) and all(
        layer.activation is read and layer.name in quantized and layer.node.op_type == "MatMul" and layer.in_axis == 0
        and (weight := constant(layer.weight_value)) is not None and weight.dtype == np.float32
        and len(layer.weight_value.uses()) == 1
        and not layer.weight_value.is_graph_output() for layer in group.layers)


def _apply(graph: ir.Graph, result: GroupResult, split: Split, stats: ActivationStats) -> GroupResult:
    group = result.group
    name = str(group.activation.name)
    assert result.scales is not None
    indices = ir.Value(name=f"{name}/split/indices", const_value=ir.tensor(split.source, name=f"{name}/split/indices"))
    dtype = group.activation.dtype or ir.DataType.FLOAT
    factors = ir.Value(name=f"{name}/split/factors", const_value=ir.tensor(
        (1.0 / split.copies).astype(np.float32).astype(dtype.numpy()), name=f"{name}/split/factors"))
    graph.register_initializer(indices)
    graph.register_initializer(factors)
    # what the layers read now: the activation, or the explicit smoothing Mul's output in front of it
    read = group.layers[0].activation
    gather = ir.node("Gather", [read, indices], attributes={"axis": -1}, name=f"{name}/split/Gather")
    mul = ir.node("Mul", [gather.outputs[0], factors], name=f"{name}/split/Mul")
    gather.outputs[0].name = f"{name}/split/gathered"
    gather.outputs[0].dtype = dtype
    split_value = mul.outputs[0]
    split_value.name = f"{name}/split"
    split_value.dtype = dtype
    readers = [layer.node for layer in group.layers]
    graph.insert_before(min(readers, key=lambda node: list(graph).index(node)), [gather, mul])
    for layer in group.layers:
        weight = layer.weight[split.source]  # a row per copy, the row itself
        new_weight = ir.Value(name=f"{layer.weight_value.name}/split", const_value=ir.tensor(
            weight, name=f"{layer.weight_value.name}/split"))
        graph.register_initializer(new_weight)
        old = layer.weight_value
        layer.node.replace_input_with(0, split_value)
        layer.node.replace_input_with(1, new_weight)
        if not old.uses() and old.name in graph.initializers:
            graph.initializers.pop(old.name)
    stats.channel_max[split_value.name] = stats.channel_max[name][split.source]
    if name in stats.rows:
        stats.rows[split_value.name] = stats.rows[name][:, split.source]
    if name in stats.hessians:
        stats.hessians[split_value.name] = stats.hessians[name][np.ix_(split.source, split.source)]
    scales = (result.scales[split.source] * split.copies).astype(result.scales.dtype)
    before = float(np.max(stats.channel_max[name] / result.scales))
    after = float(np.max(stats.channel_max[split_value.name] / scales))
    count = int(np.count_nonzero(split.copies[: int(split.source.max()) + 1] > 1))
    method = (f"{result.method}; {count} outlier channel{'s' if count > 1 else ''} split into {split.added} more "
              f"copies: static range {before:.3g} -> {after:.3g}")
    return replace(result, group=SmoothingGroup(split_value, group.layers, group.absorber, group.reason),
                   scales=scales, method=method)
