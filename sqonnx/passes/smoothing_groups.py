"""Find smoothing groups: the linear layers that read one activation, and what can absorb 1/s.

Siblings that read the same X (q/k/v, gate/up, BERT query/key/value) must share one s, because X/s is
computed once. The absorber is the node that produced X and can take 1/s into its constants exactly:

* a normalization whose last-axis affine parameters scale its first output (LayerNormalization,
  SimplifiedLayerNormalization, SkipLayerNormalization, SkipSimplifiedLayerNormalization);
* a Mul by a per-channel constant (RMSNorm as optimum exports it: ...Div -> Mul(weight));
* a preceding linear layer whose output reaches X only through per-channel-linear ops (Mul by another
  activation, Add of a constant bias), such as Llama's up_proj -> Mul(SiLU(gate)) -> down_proj;
* v_proj, for the attention output projection (o_proj, BERT's attention output dense): its input is
  softmax(QK^T) V per head, moved around by Reshape/Transpose (and Unsqueeze/Expand for grouped-query
  attention, Concat with the key/value cache), so each of its channels is a mix over tokens of one value
  channel, and 1/s folds into v_proj's output columns. With grouped-query attention several query heads
  read one KV head, so those channels share one s.

Folding is only exact when every reader of X is in the group; otherwise the group has no absorber and
the reason says why.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from sqonnx.graph import LinearLayer, as_linear_layer, constant, find_linear_layers

# op_type -> (index of the scale, index of the bias or None); output 0 is the normalized value.
NORM_PARAMETERS: dict[str, tuple[int, int | None]] = {
    "LayerNormalization": (1, 2),
    "SimplifiedLayerNormalization": (1, None),
    "SkipLayerNormalization": (2, 3),
    "SkipSimplifiedLayerNormalization": (2, None),
}


SHAPE_ONLY_OPS = ("Shape", "Size")


@dataclass(frozen=True)
class NormAbsorber:
    node: ir.Node
    scale_index: int
    bias_index: int | None
    kind: str = "norm"


@dataclass(frozen=True)
class MulAbsorber:
    node: ir.Node
    const_index: int
    kind: str = "mul"


@dataclass(frozen=True)
class LinearAbsorber:
    layer: LinearLayer
    # (Add node, index of its constant bias) met between the layer and X; their biases scale too.
    bias_adds: tuple[tuple[ir.Node, int], ...] = ()
    kind: str = "linear"

    @property
    def node(self) -> ir.Node:
        return self.layer.node


@dataclass(frozen=True)
class ValueAbsorber:
    """v_proj behind an attention output; channel_map[c] is the value channel behind input channel c."""

    layer: LinearLayer
    channel_map: np.ndarray
    values: ir.Value  # v_proj's output (after its bias): what calibration must also measure
    bias_adds: tuple[tuple[ir.Node, int], ...] = ()
    kind: str = "value"

    @property
    def node(self) -> ir.Node:
        return self.layer.node

    @property
    def value_channels(self) -> int:
        return int(self.layer.weight.shape[1 - self.layer.in_axis])


Absorber = NormAbsorber | MulAbsorber | LinearAbsorber | ValueAbsorber

# Ops that only move, copy or repeat channels between v_proj and the attention output.
MOVING_OPS = ("Reshape", "Transpose", "Unsqueeze", "Squeeze", "Expand")


@dataclass
class SmoothingGroup:
    activation: ir.Value
    layers: list[LinearLayer]
    absorber: Absorber | None
    reason: str = ""  # why there is no absorber
    channels: int = field(init=False)

    def __post_init__(self) -> None:
        self.channels = self.layers[0].in_channels


def find_smoothing_groups(graph: ir.Graph, attention_heads: int | None = None) -> list[SmoothingGroup]:
    """One group per activation read by linear layers, in graph order. `attention_heads` (query heads,
    from config.json) is needed to fold attention outputs through v_proj under grouped-query attention."""
    by_activation: dict[int, list[LinearLayer]] = {}
    values: dict[int, ir.Value] = {}
    for layer in find_linear_layers(graph):
        key = id(layer.activation)
        by_activation.setdefault(key, []).append(layer)
        values[key] = layer.activation
    groups = []
    for key, layers in by_activation.items():
        activation = values[key]
        absorber, reason = _find_absorber(activation, layers)
        if absorber is None and activation.producer() is not None and " also read by " not in reason:
            value_absorber, why = _find_value_absorber(activation, layers[0].in_channels, attention_heads)
            absorber, reason = value_absorber, (why or reason) if value_absorber is None else ""
        groups.append(SmoothingGroup(activation, layers, absorber, reason))
    return groups


def _find_absorber(activation: ir.Value, layers: list[LinearLayer]) -> tuple[Absorber | None, str]:
    readers = {id(layer.node) for layer in layers}
    if activation.is_graph_output():
        return None, "the activation is a graph output"
    others = [use.node for use in _value_uses(activation) if id(use.node) not in readers or use.idx != 0]
    if others:
        names = ", ".join(sorted({n.name or n.op_type for n in others})[:3])
        return None, f"the activation is also read by {names}"
    if len({layer.in_channels for layer in layers}) != 1:
        return None, "the readers disagree on the channel count"
    channels = layers[0].in_channels
    producer = activation.producer()
    if producer is None:
        return None, "the activation is a graph input"
    return _absorber_of(producer, activation, channels)


def _absorber_of(producer: ir.Node, activation: ir.Value, channels: int) -> tuple[Absorber | None, str]:
    op = producer.op_type
    if op in NORM_PARAMETERS and activation is producer.outputs[0]:
        scale_index, bias_index = NORM_PARAMETERS[op]
        axis = producer.attributes.get_int("axis", -1)
        if axis != -1 and (activation.shape is None or axis != len(activation.shape) - 1):
            return None, f"{producer.name} normalizes over axis {axis}, not the channel axis"
        if not _is_channel_vector(producer, scale_index, channels, required=True):
            return None, f"{producer.name} has no constant per-channel scale"
        if bias_index is not None:
            if bias_index >= len(producer.inputs) or producer.inputs[bias_index] is None:
                bias_index = None
            elif not _is_channel_vector(producer, bias_index, channels, required=True):
                return None, f"{producer.name} has a bias that is not a constant per-channel vector"
        return NormAbsorber(producer, scale_index, bias_index), ""
    if op == "Mul" and producer.domain == "":
        for index in (1, 0):
            if _is_channel_vector(producer, index, channels, required=True, allow_scalar=True):
                return MulAbsorber(producer, index), ""
    linear = _find_linear_absorber(activation, channels)
    if linear is not None:
        return linear, ""
    return None, f"its producer {producer.name or op} ({op}) cannot absorb a per-channel factor"


def _is_channel_vector(node: ir.Node, index: int, channels: int, *, required: bool,
                       allow_scalar: bool = False) -> bool:
    """Whether input `index` is a constant that varies (at most) along the last axis only."""
    if index >= len(node.inputs) or node.inputs[index] is None:
        return not required
    array = constant(node.inputs[index])
    if array is None or array.dtype != np.float32:
        return False
    if array.ndim == 0:
        return allow_scalar
    if any(d != 1 for d in array.shape[:-1]):
        return False
    return array.shape[-1] == channels or (allow_scalar and array.shape[-1] == 1)


def _find_linear_absorber(activation: ir.Value, channels: int) -> LinearAbsorber | None:
    """Walk back from X through per-channel-linear ops to a linear layer that produced it."""
    bias_adds: list[tuple[ir.Node, int]] = []
    value = activation
    while True:
        node = value.producer()
        if node is None:
            return None
        if value is not activation and (len(_value_uses(value)) != 1 or value.is_graph_output()):
            return None  # scaling this intermediate would change another reader
        layer = as_linear_layer(node)
        if layer is not None:
            out_axis = 1 - layer.in_axis
            if layer.weight.shape[out_axis] != channels:
                return None
            return LinearAbsorber(layer, tuple(bias_adds))
        if node.domain != "" or node.op_type not in ("Mul", "Add"):
            return None
        inputs = list(node.inputs)
        if len(inputs) != 2 or inputs[0] is None or inputs[1] is None:
            return None
        if node.op_type == "Add":
            const_index = next((i for i in (1, 0) if _is_channel_vector(node, i, channels, required=True)),
                               None)
            if const_index is None:
                return None
            bias_adds.append((node, const_index))
            value = inputs[1 - const_index]
            continue
        # Mul of two activations: (a * b) / s == (a / s) * b, so follow whichever side leads to a
        # linear layer; the other side cannot depend on it because every link has one reader.
        for index in (1, 0):
            if constant(inputs[index]) is not None:
                break
            found = _linear_absorber_behind(inputs[index], channels)
            if found is not None:
                return LinearAbsorber(found.layer, tuple(bias_adds) + found.bias_adds)
        return None


def _linear_absorber_behind(value: ir.Value, channels: int) -> LinearAbsorber | None:
    """The walk continued from one operand of a Mul; that operand must have the Mul as only reader."""
    if len(_value_uses(value)) != 1 or value.is_graph_output():
        return None
    return _find_linear_absorber(value, channels)


def _value_uses(value: ir.Value) -> list:
    """Readers of a value's numbers; Shape and Size read only its shape, which scaling keeps."""
    return [use for use in value.uses() if use.node.op_type not in SHAPE_ONLY_OPS or use.node.domain != ""]


def _find_value_absorber(activation: ir.Value, channels: int,
                         attention_heads: int | None) -> tuple[ValueAbsorber | None, str]:
    """Walk back from an attention output through channel-moving ops and the probabilities x V MatMul
    to v_proj (see the module docstring). Every intermediate must have no other reader but the key/value
    cache output, which then carries V/s and round-trips through past_key_values in the same space."""
    value, crossed_attention, bias_adds = activation, False, []
    mixed: ir.Value | None = None  # the value channels as attention mixes them (after v_proj's bias)
    while True:
        node = value.producer()
        if node is None:
            return None, ""
        if value is not activation:
            uses = _value_uses(value)
            if len(uses) != 1 or (value.is_graph_output() and node.op_type != "Concat"):
                return None, ""
        layer = as_linear_layer(node)
        if layer is not None:
            break
        inputs = list(node.inputs)
        if node.domain != "":
            return None, ""
        if node.op_type in MOVING_OPS:
            value = inputs[0]
        elif node.op_type == "MatMul" and not crossed_attention and len(inputs) == 2 and inputs[1] is value_of(inputs):
            crossed_attention, value = True, inputs[1]
        elif node.op_type == "Concat" and crossed_attention:
            live = [v for v in inputs if v is not None and not v.is_graph_input()]
            if len(live) != 1:
                return None, ""
            value = live[0]
        elif node.op_type == "Add" and crossed_attention and len(inputs) == 2:
            const_index = next((i for i in (1, 0) if constant(inputs[i]) is not None), None)
            if const_index is None:
                return None, ""
            bias_adds.append((node, const_index))
            mixed = mixed or value
            value = inputs[1 - const_index]
        else:
            return None, ""
        if value is None:
            return None, ""
    if not crossed_attention:
        return None, ""
    out_channels = int(layer.weight.shape[1 - layer.in_axis])
    if any(constant(add.inputs[i]).size not in (1, out_channels) for add, i in bias_adds):  # type: ignore[union-attr]
        return None, ""
    if channels == out_channels:  # one query head per value head: the layout is kept channel for channel
        return ValueAbsorber(layer, np.arange(channels), mixed or value, tuple(bias_adds)), ""
    if channels % out_channels or not attention_heads or channels % attention_heads:
        return None, (f"its input mixes value heads of {layer.name} (grouped-query attention); the head count "
                      "from config.json beside the model is needed to fold into it")
    head_dim, repeats = channels // attention_heads, channels // out_channels
    index = np.arange(channels)
    return ValueAbsorber(layer, (index // head_dim // repeats) * head_dim + index % head_dim, mixed or value,
                         tuple(bias_adds)), ""


def value_of(inputs: list[ir.Value | None]) -> ir.Value | None:
    """The right operand of probabilities x V: the one that is not a constant."""
    right = inputs[1]
    return right if right is not None and constant(right) is None else None
