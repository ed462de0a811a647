"""The walk back from X to a linear layer whose output columns can take 1/s, shared by the `linear`
(MLP), `value` and `gqa` (attention) absorbers, and the fold into those columns. Public because the
rotation pass (passes/rotate.py) finds the value columns behind o_proj for R2 with the same walk.

Between the layer and X there may be:

* per-channel-linear ops, which commute with a per-channel factor: an Add of a constant bias (the bias
  divides too), a Mul by another activation or a constant ((a * b) / s = (a / s) * b), and positively
  homogeneous activations, ReLU(x / s) = ReLU(x) / s for s > 0 (OPT's fc1 -> ReLU -> fc2);
* channel-moving ops (Reshape, Transpose, Split, Slice, Gather, Unsqueeze, Squeeze, Expand, float Cast, Concat with
  a cache input) and, in attention, the probabilities x V MatMul, which mixes tokens but never channels.
  Where X's channel c comes from is then not read off the graph's constants (head counts hide in shape
  subgraphs) but measured: calibration replays the moves on labelled columns (see `Probe`).

A fused projection (qkv_proj, query_key_value, c_attn, gate_up_proj) is split by Split/Slice/Gather; only
the columns that reach X are divided, which is exact when the other readers of the fused output read
disjoint columns (checked), so q and k, or the gate half, keep their values.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from sqonnx.calibrators import ActivationStats
from sqonnx.graph.layers import LinearLayer, as_linear_layer
from sqonnx.graph.match import is_standard
from sqonnx.graph.tensors import constant, is_constant, set_constant_input
from sqonnx.math.smoothing import along
from sqonnx.passes.absorbers.base import SHAPE_ONLY_OPS, Absorber, Probe, is_channel_vector, single_reader, value_uses

MOVING_OPS = ("Reshape", "Transpose", "Unsqueeze", "Squeeze", "Expand", "Identity", "Split", "Slice", "Gather",
              "Concat", "Cast")
# A Cast moves no channel and scales nothing: between float types (an FP16 export casts v to float32 before
# attention) it passes a per-channel factor through, up to the rounding of the narrower type.
FLOAT_CASTS = (ir.DataType.FLOAT.value, ir.DataType.FLOAT16.value, ir.DataType.BFLOAT16.value)
SPLITTING_OPS = ("Split", "Slice", "Gather")
HOMOGENEOUS_OPS = ("Relu",)  # f(x / s) = f(x) / s for every s > 0


@dataclass(frozen=True)
class ColumnPath:
    """How X is made from a linear layer's output columns."""

    layer: LinearLayer
    channel_adds: tuple[tuple[ir.Node, int], ...]  # constant Adds in X's channel order
    column_adds: tuple[tuple[ir.Node, int], ...]  # constant Adds in the layer's column order
    moves: tuple[tuple[ir.Node, int, int], ...]  # channel-moving ops, layer side first
    values: ir.Value  # the layer's output after its column Adds, before any move
    passes: tuple[str, ...]  # per-channel ops crossed (Relu, Mul), for the report
    # (move on the path, the other readers of its input and the input index they read it at)
    splits: tuple[tuple[ir.Node, tuple[tuple[ir.Node, int], ...]], ...] = ()

    @property
    def out_columns(self) -> int:
        return self.layer.out_channels

    def probe(self, target: ir.Value, channels: int) -> Probe | None:
        if not self.moves:
            return None
        position = {id(node): step for step, (node, _, _) in enumerate(self.moves)}
        splits = tuple((position[id(node)], readers) for node, readers in self.splits)
        return Probe(str(target.name), self.layer.node.outputs[0], self.out_columns, self.moves, target, channels,
                     splits)

    def column_map(self, target: ir.Value, channels: int, stats: ActivationStats) -> np.ndarray | None:
        """Column of the layer behind each channel of X; None when it could not be measured."""
        if not self.moves:
            return np.arange(channels) if channels == self.out_columns else None
        found = stats.maps.get(str(target.name))
        return None if found is None or found.shape != (channels,) else found

    def fold(self, graph: ir.Graph, scales: np.ndarray, columns: np.ndarray) -> None:
        """W[:, columns[c]] /= s_c and the same for every bias on the way; other columns stay."""
        factors = np.ones(self.out_columns, np.float64)
        factors[columns] = scales
        layer = self.layer
        weight = layer.weight
        # Divided in the weight's own precision when it is float32 (one rounding, as in float64 then rounded).
        divisor = along(factors.astype(np.float32) if weight.dtype == np.float32 else factors, 1 - layer.in_axis)
        set_constant_input(graph, layer.node, 1, weight / divisor, suffix="_smoothed")
        if layer.bias_value is not None:
            _divide_constant(graph, layer.node, 2, factors)
        for add, index in self.column_adds:
            _divide_constant(graph, add, index, factors)
        for add, index in self.channel_adds:
            _divide_constant(graph, add, index, scales)


@dataclass(frozen=True)
class ColumnAbsorber(Absorber):
    """The shared half of the absorbers that fold into a linear layer's output columns: channel c of X (the
    `target`) comes from column `columns(stats)[c]`, measured by the path's probe; channels from one column
    share its factor."""

    path: ColumnPath
    target: ir.Value
    channels: int

    @property
    def node(self) -> ir.Node:
        return self.path.layer.node

    @property
    def layer_name(self) -> str:
        return self.path.layer.name

    def probe(self) -> Probe | None:
        return self.path.probe(self.target, self.channels)

    def columns(self, stats: ActivationStats) -> np.ndarray | None:
        """The layer column behind each channel of X; None when it could not be measured."""
        return self.path.column_map(self.target, self.channels, stats)

    def factor_map(self, stats: ActivationStats) -> np.ndarray | None:
        return self.columns(stats)

    def check(self, act_max: np.ndarray, stats: ActivationStats) -> str:
        if self.columns(stats) is None:
            return f"the columns of {self.layer_name} behind the activation could not be measured"
        return ""

    def fold(self, graph: ir.Graph, scales: np.ndarray, stats: ActivationStats) -> None:
        columns = self.columns(stats)
        assert columns is not None
        self.path.fold(graph, scales, columns)

    def bound_problem(self, act_max: np.ndarray, stats: ActivationStats, what: str) -> str:
        """Attention probabilities are >= 0 and sum to at most 1, so |output channel c| can never exceed
        max |value column behind c|; a violated bound means the layout is not the one the map assumes."""
        columns = self.columns(stats)
        value_max = stats.channel_max.get(str(self.path.values.name))
        if columns is None:
            return f"the value columns of {self.layer_name} behind {what} could not be measured"
        if value_max is None:
            return "no calibration statistics for the value projection"
        violated = int(np.count_nonzero(act_max > value_max[columns] * (1 + 1e-3) + 1e-6))
        if violated:
            return (f"{violated} channels of {what} exceed the value channels of {self.layer_name} they should mix; "
                    "the attention layout is not the expected one")
        return ""

    def value_statistics(self) -> dict[str, int]:
        return {str(self.path.values.name): self.path.out_columns}


def _divide_constant(graph: ir.Graph, node: ir.Node, index: int, factors: np.ndarray) -> None:
    array = constant(node.inputs[index])
    assert array is not None
    shape = (*array.shape[:-1], factors.shape[0]) if array.ndim else factors.shape
    set_constant_input(graph, node, index, (np.broadcast_to(array, shape) / factors).astype(array.dtype),
                       suffix="_smoothed")


def walk_to_linear(x: ir.Value, channels: int, *, attention: bool) -> ColumnPath | None:
    """The path from a linear layer to `x`, or None. `attention`: the path must cross probabilities x V."""
    return _walk(x, x, channels, attention, crossed=False, moves=[], adds=[], passes=[], splits=[])


def _walk(x: ir.Value, value: ir.Value, channels: int, attention: bool, crossed: bool,
          moves: list[tuple[ir.Node, int, int]], adds: list[tuple[ir.Node, int, int]],
          passes: list[str], splits: list[tuple[ir.Node, tuple[tuple[ir.Node, int], ...]]]) -> ColumnPath | None:
    consumer: ir.Node | None = None
    while True:
        node = value.producer()
        if node is None or not is_standard(node):
            return None
        if value is not x:
            others = _other_readers(value, consumer)
            if others is None:
                return None
            if others:
                assert consumer is not None
                splits.append((consumer, others))
        layer = as_linear_layer(node)
        if layer is not None:
            if attention and not crossed:
                return None
            return _path(layer, value, moves, adds, passes, channels, splits)
        inputs = list(node.inputs)
        live: int | None = None
        op = node.op_type
        if op in MOVING_OPS:
            live = _moving_input(node)
            if live is None:
                return None
            moves.append((node, live, _output_index(node, value)))
        elif op == "MatMul" and attention and not crossed and len(inputs) == 2 and inputs[1] is not None \
                and not is_constant(inputs[1]) and inputs[0] is not None and not is_constant(inputs[0]):
            crossed, live = True, 1
            moves.append((node, 1, 0))
        elif op == "Add" and len(inputs) == 2:
            const_index = next((i for i in (1, 0) if is_constant(inputs[i])), None)
            if const_index is None:
                return None
            adds.append((node, const_index, len(moves)))
            live = 1 - const_index
        elif op in HOMOGENEOUS_OPS and not attention and not moves:
            passes.append(op)
            live = 0
        elif op == "Mul" and not attention and not moves and len(inputs) == 2:
            const_index = next((i for i in (1, 0) if is_constant(inputs[i])), None)
            if const_index is not None:
                if not is_channel_vector(node, const_index, channels, allow_scalar=True):
                    return None
                live = 1 - const_index
            else:
                # (a * b) / s = (a / s) * b: follow whichever side leads to a linear layer; the other side
                # cannot depend on it because every link on the way has one reader (or disjoint readers).
                for index in (1, 0):
                    operand = inputs[index]
                    if operand is None or not single_reader(operand):
                        continue
                    found = _walk(x, operand, channels, attention, crossed, list(moves), list(adds),
                                  [*passes, "Mul"], list(splits))
                    if found is not None:
                        return found
                return None
        else:
            return None
        next_value = inputs[live]
        if next_value is None:
            return None
        consumer, value = node, next_value


def _path(layer: LinearLayer, output: ir.Value, moves: list[tuple[ir.Node, int, int]],
          adds: list[tuple[ir.Node, int, int]], passes: list[str], channels: int,
          splits: list[tuple[ir.Node, tuple[tuple[ir.Node, int], ...]]]) -> ColumnPath | None:
    total = len(moves)
    out_columns = layer.out_channels
    channel_adds, column_adds = [], []
    for add, index, seen in adds:
        if seen == 0:
            if not is_channel_vector(add, index, channels, allow_scalar=True):
                return None
            channel_adds.append((add, index))
        elif seen == total:
            if not is_channel_vector(add, index, out_columns, allow_scalar=True):
                return None
            column_adds.append((add, index))
        else:
            return None  # a bias between two moves: its channel order is neither X's nor the layer's
    if not moves and out_columns != channels:
        return None
    # adds were met walking back from X; the one nearest the layer is its output after the bias
    near = [add for add, _, seen in adds if seen == total]
    values = near[0].outputs[0] if near else output
    return ColumnPath(layer, tuple(channel_adds), tuple(column_adds), tuple(reversed(moves)), values,
                      tuple(passes), tuple(splits))


def _moving_input(node: ir.Node) -> int | None:
    """The input that carries the moved numbers; the others must be constants (or cache inputs for
    Concat, shape tensors for Reshape/Expand)."""
    op = node.op_type
    if op == "Cast":
        source = node.inputs[0]
        float_in = source is not None and source.dtype is not None and source.dtype.value in FLOAT_CASTS
        return 0 if float_in and node.attributes.get_int("to", 0) in FLOAT_CASTS else None
    if op == "Concat":
        live = [i for i, v in enumerate(node.inputs) if v is not None and not v.is_graph_input()
                and not is_constant(v)]
        return live[0] if len(live) == 1 else None
    if op in SPLITTING_OPS and not all(v is None or _shape_derived(v) for v in node.inputs[1:]):
        return None  # data-dependent indices
    return 0


def _shape_derived(value: ir.Value, depth: int = 0) -> bool:
    """A constant, or computed only from constants and tensor shapes (Phi-3 and GPT-NeoX slice their fused
    outputs at size // 2 or at head_dim multiples read off Shape)."""
    if is_constant(value):
        return True
    node = value.producer()
    if node is None or depth > 16:
        return False
    if node.op_type in SHAPE_ONLY_OPS:
        return True
    return all(v is None or _shape_derived(v, depth + 1) for v in node.inputs)


def _output_index(node: ir.Node, value: ir.Value) -> int:
    return next(i for i, out in enumerate(node.outputs) if out is value)


def _other_readers(value: ir.Value, consumer: ir.Node | None) -> tuple[tuple[ir.Node, int], ...] | None:
    """None when scaling some of `value`'s columns could change another reader; else the other readers,
    which then must be moves that split `value` (the q/k/v or gate/up parts of a fused output) and are
    checked during calibration to read none of the divided columns (see `Probe.splits`)."""
    uses = value_uses(value)
    if value.is_graph_output():
        # A key/value cache output ("present") may carry V/s: it comes back as a past input in the same space.
        # Either the Concat that joins past and new is on the path after it, or it is that Concat's output
        # (an optimum with-past export: present = Concat(past, v), read on by attention or GQA's repeat).
        producer = value.producer()
        joins_past = producer is not None and producer.op_type == "Concat" and any(
            v is not None and v.is_graph_input() for v in producer.inputs)
        ok = consumer is not None and (consumer.op_type == "Concat" or joins_past) and len(uses) == 1
        return () if ok else None
    if len(uses) == 1:
        return ()
    if consumer is None or consumer.op_type not in SPLITTING_OPS:
        return None
    others = tuple((use.node, use.idx) for use in uses if use.node is not consumer)
    if any(not is_standard(node, *MOVING_OPS) or _moving_input(node) != index
           for node, index in others):
        return None
    return others
