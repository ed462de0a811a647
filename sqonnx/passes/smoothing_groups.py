"""Find smoothing groups: the linear layers that read one activation, and what can absorb 1/s.

Siblings that read the same X (q/k/v, gate/up, Falcon's parallel attention and MLP) must share one s,
because X/s is computed once. The absorber is the node that produced X and can take 1/s into its
constants exactly; the kinds are the modules of `sqonnx.passes.absorbers`, tried in registry order.
Folding is only exact when every reader of X is in the group (Shape readers are fine); otherwise the
group has no absorber and the reason says why.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from sqonnx.graph.layers import LinearLayer, find_linear_layers
from sqonnx.graph.match import NoMatch, is_standard
from sqonnx.graph.tensors import constant
from sqonnx.passes.absorbers import ABSORBERS, Absorber, Probe, Site
from sqonnx.passes.absorbers.base import single_reader, value_uses


@dataclass
class SmoothingGroup:
    activation: ir.Value
    layers: list[LinearLayer]
    absorber: Absorber | None
    reason: str = ""  # why there is no absorber
    source: ir.Value | None = None  # the same numbers before a Reshape that flattens token axes, if any
    channels: int = field(init=False)

    def __post_init__(self) -> None:
        self.channels = self.layers[0].in_channels


@dataclass
class StatisticsRequest:
    """What calibration must measure for a set of groups: per-channel maxima (name -> channels) and
    channel maps (see `Probe`)."""

    channel_max: dict[str, int] = field(default_factory=dict)
    probes: list[Probe] = field(default_factory=list)


def find_smoothing_groups(graph: ir.Graph) -> list[SmoothingGroup]:
    """One group per activation read by linear layers, in graph order."""
    by_activation: dict[int, list[LinearLayer]] = {}
    values: dict[int, ir.Value] = {}
    for layer in find_linear_layers(graph):
        key = id(layer.activation)
        by_activation.setdefault(key, []).append(layer)
        values[key] = layer.activation
    groups = []
    for key, layers in by_activation.items():
        activation = values[key]
        absorber, reason, source = _find_absorber(activation, layers)
        groups.append(SmoothingGroup(activation, layers, absorber, reason,
                                     source if absorber is not None and source is not activation else None))
    return groups


def statistics_needed(groups: list[SmoothingGroup], quantized: set[str]) -> StatisticsRequest:
    request = StatisticsRequest()
    for group in groups:
        if not any(layer.name in quantized for layer in group.layers):
            continue
        request.channel_max[str(group.activation.name)] = group.channels
        if group.source is not None:
            request.channel_max[str(group.source.name)] = group.channels
        if group.absorber is not None:
            request.channel_max.update(group.absorber.channel_statistics())
            probe = group.absorber.probe()
            if probe is not None:
                request.probes.append(probe)
    return request


def _find_absorber(activation: ir.Value, layers: list[LinearLayer]) -> tuple[Absorber | None, str, ir.Value]:
    readers = {id(layer.node) for layer in layers}
    if activation.is_graph_output():
        return None, "the activation is a graph output", activation
    others = [use.node for use in value_uses(activation) if id(use.node) not in readers or use.idx != 0]
    if others:
        names = ", ".join(sorted({n.name or n.op_type for n in others})[:3])
        return None, f"the activation is also read by {names}", activation
    if len({layer.in_channels for layer in layers}) != 1:
        return None, "the readers disagree on the channel count", activation
    channels = layers[0].in_channels
    if activation.producer() is None:
        return None, "the activation is a graph input", activation
    site = Site(activation, _before_flattening(activation, channels), channels)
    reasons = []
    for kind in ABSORBERS:
        found = kind.match(site)
        if not isinstance(found, NoMatch):
            return found, "", site.source
        if found.reason:
            reasons.append(found.reason)
    producer = site.producer
    assert producer is not None
    return None, reasons[0] if reasons else (
        f"its producer {producer.name or producer.op_type} ({producer.op_type}) cannot absorb a per-channel factor"
    ), activation


def _before_flattening(activation: ir.Value, channels: int) -> ir.Value:
    """The value behind Reshape([-1, C]) (or [N, C]) that flattens token axes and keeps the channel axis.

    GPT-2 and Mixtral write the shape as Concat([-1], Unsqueeze(Gather(Shape(x), -1))): the last axis of
    x itself. With a constant C the absorber behind it proves x's last axis is C (a norm's scale, a layer's
    columns)."""
    value = activation
    while (node := value.producer()) is not None and is_standard(node, "Reshape"):
        source = node.inputs[0]
        if source is None or len(node.inputs) < 2 or node.inputs[1] is None or node.attributes.get_int("allowzero", 0):
            break
        if not _keeps_last_axis(node.inputs[1], source, channels) or not single_reader(source):
            break
        value = source
    return value


def _keeps_last_axis(shape: ir.Value, source: ir.Value, channels: int) -> bool:
    array = constant(shape)
    if array is not None:
        return array.ndim == 1 and len(array) >= 2 and int(array[-1]) == channels
    concat = shape.producer()
    if concat is None or concat.op_type != "Concat" or len(concat.inputs) < 2 or concat.inputs[-1] is None:
        return False
    last = concat.inputs[-1]
    if (array := constant(last)) is not None:
        return array.size >= 1 and int(np.ravel(array)[-1]) == channels
    return _is_last_dim_of(last, source)


def _is_last_dim_of(value: ir.Value, source: ir.Value) -> bool:
    """Whether `value` is source.shape[-1]: Gather(Shape(x), -1) or Slice(Shape(x), -1:), through the
    Unsqueeze/Squeeze/Cast that exporters wrap around it."""
    node = value.producer()
    while node is not None and node.op_type in ("Unsqueeze", "Squeeze", "Cast") and node.inputs[0] is not None:
        node = node.inputs[0].producer()
    if node is None or node.op_type not in ("Gather", "Slice") or node.inputs[0] is None:
        return False
    shape_of = node.inputs[0].producer()
    if shape_of is None or shape_of.op_type != "Shape" or shape_of.inputs[0] is not source or shape_of.attributes:
        return False
    first = constant(node.inputs[1])
    # -1, or the last axis by number (Mixtral: Gather(Shape(x), 2)); calibration confirms that the flattened
    # X has the same per-channel maxima as `source` before the fold relies on it.
    if first is None or first.size != 1 or (node.op_type == "Slice" and int(np.ravel(first)[0]) != -1):
        return False
    if node.op_type == "Slice":
        end = constant(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
        return end is not None and int(np.ravel(end)[0]) >= np.iinfo(np.int32).max
    return True
