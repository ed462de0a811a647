"""Rotate the residual stream of a pre-norm RMSNorm decoder by an orthogonal Q (QuaRot's R1), and each
value head by an orthogonal H (R2), exactly in FP32, before smoothing and quantization.

Why: a few hidden channels of an LLM's residual stream are 10-100x larger than the rest in every layer,
and a per-tensor INT8 scale is set by them. x Q spreads each outlier over all channels (a randomized
Hadamard Q gives every channel the same share), so what the norms hand to q/k/v, gate/up and the LM
head has no outlier channel left for smoothing to chase.

Why it is exact: RMSNorm without its weight commutes with an orthogonal Q, because ||x Q|| = ||x||:
x Q / rms(x Q) = (x / rms(x)) Q. So once each norm's weight w is folded into the linear layers that read
the norm (W' = diag(w) W, the norm keeps a weight of ones), the whole stream can live in the rotated
basis: the embedding table becomes E Q, every reader of a norm W' = Q^T diag(w) W (rows, the input
channels), every writer into the stream (o_proj, down_proj, MoE experts' w2) W' = W Q and b' = b Q
(output columns), and the residual Adds add rotated to rotated. The norms keep their weight Mul (of
ones), so SmoothQuant can still fold 1/s into it afterwards.

R2: the attention output of each head is a mix over tokens of its value head, so v_proj's columns of one
head can be rotated by H when o_proj's rows of every query head reading it are rotated by H^T. One H is
used for every head (block-diagonal over heads), which also covers grouped-query attention, where
several query heads read one value head: they all get the same H^T. For a fused qkv_proj only the value
columns turn. Head counts come from config.json beside the model (num_attention_heads,
num_key_value_heads, head_dim) and are checked against the graph (the Reshape into heads, the widths of
v and o); without a config the head size is read off that Reshape. Behind onnxruntime's
GroupQueryAttention (onnxruntime-genai's graphs) the heads are the node's attributes, and the value cache
it writes holds V H, which comes back as past in the same basis, so decode steps stay exact.

Found from the graph, no per-family config: the embedding `Gather` starts the stream; every reader of a
stream value must be a residual Add, an RMSNorm as optimum exports it (Cast? Pow ReduceMean Add Sqrt,
then Div(1, .) or Reciprocal and Mul, or Div(x, .), then Cast? and Mul(weight)) or as onnxruntime fuses
it (below), a Cast to float, a Mul by a scalar (Gemma's sqrt(hidden) embedding scale) or Shape; anything
else is refused with the node named. What a residual Add adds must come from linear layers through bias
Adds, Reshape, sums of several branches, and per-token factors (Mixtral's router weights, last axis 1).
Gemma 3's post-norms (a norm between o_proj or down_proj and the residual Add) have no linear layer after
them to take Q: their weight Mul becomes a MatMul by diag(w) Q at run time (`online` in the result; keep
those float).

onnxruntime's fused norms (its optimizer's, and what onnxruntime-genai's model builder writes):
SimplifiedLayerNormalization(x, gamma) is x / rms(x) * gamma over the last axis, the same RMSNorm (epsilon
inside the root, stash_type only the precision of the statistics), so gamma is folded like the weight Mul
and set to ones. SkipSimplifiedLayerNormalization(input, skip, gamma[, bias]) is a residual Add and the
next norm in one node: output 3 (input + skip + bias) is the stream from there on (the final norm has
none), output 0 the norm its readers read; the stream may be either of input and skip (the other is the
branch, walked as for an Add), and a bias is a constant added to the stream, so it becomes b Q. Their
statistics outputs (mean, inverse RMS) must be unread.

Not handled, refused with a reason: LayerNorm (and its unfused ReduceMean/Sub form) subtracts the mean
over channels, and mean(x Q) is not mean(x) Q: the mean direction would first have to be projected out
of every writer and the embedding (SliceGPT / QuaRot's LayerNorm conversion), which this pass does not
do. A residual stream that is itself a model output.

A tied LM head (MatMul reading Transpose(embedding)) already has a constant of its own (`prepare` folds
the Transpose, passes/transposed.py); rotated, it no longer equals the table E Q transposed, so it stays a
copy: INT8 in the output, or one more float32 vocab x hidden table (113 MB on SmolLM2) if it is excluded.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx_ir as ir

from sqonnx.calibrators.data import HeadLayout, head_layout
from sqonnx.graph.layers import LinearLayer, as_linear_layer, find_linear_layers
from sqonnx.graph.match import Match, NoMatch, is_standard
from sqonnx.graph.tensors import (
    FLOAT_TYPES,
    add_initializer,
    constant,
    constant_shape,
    deferred,
    is_constant,
    set_constant_input,
)
from sqonnx.math.rotation import Orthogonal, block_diagonal, orthogonal, rotate_columns, rotate_rows, scaled_rotation
from sqonnx.passes.absorbers.base import Site, is_channel_vector, value_uses
from sqonnx.passes.absorbers.columns import FLOAT_CASTS, ColumnPath, walk_to_linear
from sqonnx.passes.absorbers.gqa import GroupQueryAttentionAbsorber
from sqonnx.passes.absorbers.norm import FUSED_NORMS

logger = logging.getLogger(__name__)

ROTATED_KEY = "sqonnx.rotated"
_ELEMENTWISE = ("Add", "Sub", "Mul", "Div", "Cast", "Softmax", "Sigmoid", "Relu", "Neg", "Exp", "Sqrt", "Pow",
                "Where", "Equal", "Less", "Greater", "GreaterOrEqual", "LessOrEqual", "And", "Or", "Not", "Tanh")


@dataclass(frozen=True)
class RotationResult:
    """What `RotatePass` rotated, or why it left the model alone (`reason`)."""

    rotated: bool
    reason: str = ""
    hidden: int = 0
    kind: str = ""  # "randomized Hadamard" or "random orthogonal"
    seed: int = 0
    tables: tuple[str, ...] = ()  # embedding tables turned into E Q
    norms: tuple[str, ...] = ()  # values the folded norms hand to their readers
    readers: tuple[str, ...] = ()  # linear layers reading a norm: Q^T diag(w) W
    writers: tuple[str, ...] = ()  # linear layers writing into the stream: W Q
    online: tuple[str, ...] = ()  # MatMul nodes by diag(w) Q added after post-norms (run time, keep float)
    head_dim: int = 0  # R2's H size; 0 when R2 was not applied
    heads: tuple[str, ...] = ()  # o_proj layers whose value heads were rotated by H
    head_reason: str = ""  # why R2 was not applied

    def summary(self) -> str:
        if not self.rotated:
            return f"not rotated: {self.reason}"
        r2 = f"; R2 {self.head_dim}x{self.head_dim} on {len(self.heads)} attention layers" if self.head_dim else (
            f"; no R2: {self.head_reason}")
        online = f"; {len(self.online)} online rotations after post-norms" if self.online else ""
        return (f"rotated the residual stream ({self.hidden} channels, {self.kind}, seed {self.seed}): "
                f"{len(self.norms)} norms folded, {len(self.readers)} readers, {len(self.writers)} writers"
                f"{online}{r2}")


@dataclass
class RotatePassResult(ir.passes.PassResult):
    rotation: RotationResult = field(default_factory=lambda: RotationResult(False, "not run"))


class RotatePass(ir.passes.InPlacePass):
    """Rotate the residual stream (and value heads) of the model it is given; see the module docstring.

    Expects a prepared model (`passes.prepare`: constants as initializers, no Identity). A model already
    rotated (metadata `sqonnx.rotated`) is left as it is."""

    def __init__(self, seed: int = 0, heads: HeadLayout | None = None, per_head: bool = True,
                 online: bool = True) -> None:
        """`online`: accept run-time rotations after post-norms (else such a model is left alone, with a reason)."""
        super().__init__()
        self.seed = seed
        self.heads = heads
        self.per_head = per_head
        self.online = online

    def call(self, model: ir.Model) -> RotatePassResult:
        if ROTATED_KEY in model.metadata_props:
            done = RotationResult(False, f"the model is already rotated ({ROTATED_KEY}="
                                         f"{model.metadata_props[ROTATED_KEY]})")
            return RotatePassResult(model, False, done)
        graph = model.graph
        plan = find_stream(graph)
        if isinstance(plan, NoMatch):
            return RotatePassResult(model, False, RotationResult(False, plan.reason))
        if plan.post_norms and not self.online:
            why = (f"it would need {len(plan.post_norms)} run-time rotations after post-norms; pass --rotate to "
                   "accept them")
            return RotatePassResult(model, False, RotationResult(False, why))
        pairs: list[_HeadPair] = []
        head_reason = "disabled"
        head_dim = 0
        if self.per_head:
            found = find_head_pairs(graph, self.heads)
            if isinstance(found, NoMatch):
                head_reason = found.reason
            else:
                pairs, head_dim = found
                head_reason = ""
        q = orthogonal(plan.hidden, self.seed)
        kind = q.kind
        online = _rotate_stream(graph, plan, q)
        if pairs:
            h = orthogonal(head_dim, self.seed + 1).matrix()
            for pair in pairs:
                _rotate_heads(graph, pair, h, head_dim)
        result = RotationResult(
            True, hidden=plan.hidden, kind=kind, seed=self.seed,
            tables=tuple(str(node.inputs[0].name) for node in plan.tables if node.inputs[0] is not None),
            norms=tuple(str(norm.output.name) for norm in plan.norms),
            readers=tuple(layer.name for norm in plan.norms for layer in norm.readers),
            writers=tuple(layer.name for layer in plan.writers), online=tuple(online),
            head_dim=head_dim if pairs else 0, heads=tuple(pair.output.name for pair in pairs),
            head_reason=head_reason)
        model.metadata_props[ROTATED_KEY] = f"{kind},seed={self.seed}" + (f",head_dim={head_dim}" if pairs else "")
        logger.info(result.summary())
        return RotatePassResult(model, True, result)


def rotate_model(model: ir.Model, seed: int = 0, model_dir: Path | None = None,
                 online: bool = True) -> RotationResult:
    """Rotate `model` in place (R1, and R2 where the head layout is known); the result says what was
    rotated, or why nothing was. `model_dir`: where config.json lies (head counts for R2). `online`: accept
    run-time rotations after post-norms."""
    layout = head_layout(model_dir)
    if isinstance(layout, NoMatch):
        result = RotatePass(seed, per_head=False, online=online)(model)
        assert isinstance(result, RotatePassResult)
        return _with_head_reason(result.rotation, layout.reason)
    result = RotatePass(seed, layout, online=online)(model)
    assert isinstance(result, RotatePassResult)
    return result.rotation


def _with_head_reason(result: RotationResult, reason: str) -> RotationResult:
    return replace(result, head_reason=reason) if result.rotated else result


# --- finding the stream ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Norm:
    output: ir.Value  # what the readers read
    weight: tuple[ir.Node, int] | None  # the Mul by the per-channel weight and its constant input
    readers: tuple[LinearLayer, ...]
    entries: tuple[ir.Node, ...]  # the nodes that read the stream value


@dataclass
class _Plan:
    hidden: int
    tables: list[ir.Node] = field(default_factory=list)  # Gathers whose table input 0 turns into E Q
    norms: list[_Norm] = field(default_factory=list)
    writers: list[LinearLayer] = field(default_factory=list)
    biases: list[tuple[ir.Node, int]] = field(default_factory=list)  # constants added on writer branches
    post_norms: list[tuple[ir.Node, int]] = field(default_factory=list)  # weight Muls of norms on a branch


def find_stream(graph: ir.Graph) -> Match[_Plan]:
    """Where the residual stream runs and what reads and writes it, or why it cannot be rotated."""
    reason = _unsupported_norm(graph)
    if reason:
        return NoMatch(reason)
    gather = _embedding(graph)
    if gather is None:
        return NoMatch("no embedding Gather (a 2-D float table indexed by token ids) starts a residual stream")
    table = constant_shape(gather.inputs[0])
    assert table is not None
    plan = _Plan(table[0][1], [gather])
    stream: list[ir.Value] = [gather.outputs[0]]
    in_stream = {id(gather.outputs[0])}
    seen: set[int] = set()
    for value in stream:  # grows while it is walked
        if value.is_graph_output():
            return NoMatch(f"the residual stream value '{value.name}' is a model output; a rotation would change it")
        uses = value_uses(value)
        claimed: set[int] = set()
        for use in uses:
            if is_standard(use.node, "Pow") and use.idx == 0:
                norm = _match_rms_norm(use.node, value, plan.hidden)
                if isinstance(norm, NoMatch):
                    return norm
                plan.norms.append(norm)
                claimed.update(id(node) for node in norm.entries)
        for use in uses:
            node = use.node
            if id(node) in claimed or id(node) in seen:
                continue
            seen.add(id(node))
            if _is_float_cast(node) or _is_scalar_mul(node, use.idx):
                stream.append(node.outputs[0])
                in_stream.add(id(node.outputs[0]))
                continue
            if _is_fused_rms_norm(node) and use.idx == 0:
                norm = _match_fused_norm(node, plan.hidden)
                if isinstance(norm, NoMatch):
                    return norm
                plan.norms.append(norm)
                continue
            total: ir.Value | None = node.outputs[0]  # the stream after this residual Add
            if _is_skip_rms_norm(node) and use.idx in (0, 1):
                skip = _match_skip_norm(node, plan)
                if isinstance(skip, NoMatch):
                    return skip
                plan.norms.append(skip)
                total = node.outputs[3] if len(node.outputs) > 3 else None
            elif not is_standard(node, "Add") or len(node.inputs) != 2:
                return NoMatch(f"{node.name or node.op_type} ({node.op_type}) reads the residual stream "
                               f"'{value.name}'; only residual Adds, RMSNorms (Pow/ReduceMean/Sqrt then Mul by the "
                               "weight, or onnxruntime's Simplified/SkipSimplifiedLayerNormalization) and Shape may")
            other = node.inputs[1 - use.idx]
            if other is None or id(other) in in_stream or is_constant(other):
                return NoMatch(f"{node.name} adds '{other.name if other else None}' to the residual stream, "
                               "not a branch")
            position_table = _table_lookup(other)
            if position_table is not None:
                plan.tables.append(position_table)
            else:
                reason = _walk_branch(other, node, plan)
                if reason:
                    return NoMatch(reason)
            if total is not None:
                stream.append(total)
                in_stream.add(id(total))
    if not plan.norms:
        return NoMatch("no RMSNorm reads the residual stream")
    if not plan.writers and not plan.post_norms:
        return NoMatch("no linear layer writes into the residual stream")
    return plan


def _unsupported_norm(graph: ir.Graph) -> str:
    for node in graph:
        if node.op_type in FUSED_NORMS and not FUSED_NORMS[node.op_type].rms:
            return (f"{node.name} is a LayerNorm: it subtracts the mean over channels, and mean(x Q) is not mean(x) Q, "
                    "so the residual stream cannot be rotated without first removing the mean direction from every "
                    "writer (not done); only RMSNorm decoders are rotated")
        if is_standard(node, "Sub") and node.inputs[1] is not None:
            mean = node.inputs[1].producer()
            if mean is not None and mean.op_type == "ReduceMean" and mean.inputs[0] is node.inputs[0]:
                return (f"{node.name} subtracts a mean over channels (a LayerNorm): mean(x Q) is not mean(x) Q; "
                        "only RMSNorm decoders are rotated")
    return ""


def _embedding(graph: ir.Graph) -> ir.Node | None:
    for node in graph:
        if is_standard(node, "Gather") and node.attributes.get_int("axis", 0) == 0:
            table = constant_shape(node.inputs[0])
            ids = node.inputs[1]
            if table is not None and len(table[0]) == 2 and table[1] in FLOAT_TYPES and ids is not None \
                    and constant_shape(ids) is None:
                return node
    return None


def _table_lookup(value: ir.Value) -> ir.Node | None:
    """The Gather behind a learned position embedding added to the token embedding (through Casts)."""
    node = value.producer()
    while node is not None and _is_float_cast(node):
        node = node.inputs[0].producer() if node.inputs[0] is not None else None
    if node is None or not is_standard(node, "Gather") or node.attributes.get_int("axis", 0) != 0:
        return None
    table = constant_shape(node.inputs[0])
    return node if table is not None and len(table[0]) == 2 and table[1] in FLOAT_TYPES else None


def _is_float_cast(node: ir.Node) -> bool:
    return is_standard(node, "Cast") and node.attributes.get_int("to", 0) in FLOAT_CASTS


def _is_scalar_mul(node: ir.Node, index: int) -> bool:
    if not is_standard(node, "Mul") or len(node.inputs) != 2:
        return False
    array = constant(node.inputs[1 - index])
    return array is not None and array.size == 1


def _only_reader(value: ir.Value) -> ir.Node | None:
    uses = value_uses(value)
    return uses[0].node if len(uses) == 1 and not value.is_graph_output() else None


def _match_rms_norm(pow_node: ir.Node, x: ir.Value, hidden: int) -> Match[_Norm]:
    """The RMSNorm that starts at `pow_node` reading stream value `x`, with its readers."""
    scale_node = _rms_normalizer(pow_node, x)
    if isinstance(scale_node, NoMatch):
        return scale_node
    value = scale_node.outputs[0]
    while (reader := _only_reader(value)) is not None and _is_float_cast(reader):
        value = reader.outputs[0]
    weight = None
    reader = _only_reader(value)
    if reader is not None and is_standard(reader, "Mul"):
        index = 1 if reader.inputs[0] is value else 0
        if is_channel_vector(reader, index, hidden, allow_scalar=True):
            weight, value = (reader, index), reader.outputs[0]
    found = _norm_readers(value, hidden)
    if isinstance(found, NoMatch):
        return found
    return _Norm(value, weight, found, (pow_node, scale_node))


def _rms_normalizer(pow_node: ir.Node, x: ir.Value) -> Match[ir.Node]:
    """The node that outputs x / rms(x) in an RMSNorm as optimum exports it, read forwards from its Pow: Pow(x, 2),
    ReduceMean over the last axis, Add(eps), Sqrt, then Div(x, .), or Div(1, .) or Reciprocal and Mul(x, .).
    The one description of that chain: a norm on the stream is matched from its Pow (`_match_rms_norm`), a
    post-norm on a branch from its last node back (`_is_rms_normalized`)."""
    name = pow_node.name or "a Pow"
    not_rms = NoMatch(f"{name} does not start a plain RMSNorm as exported (Pow 2, ReduceMean over the last axis, "
                      "Add, Sqrt)")
    exponent = constant(pow_node.inputs[1])
    if exponent is None or exponent.size != 1 or float(exponent.ravel()[0]) != 2.0:
        return not_rms
    mean = _only_reader(pow_node.outputs[0])
    if mean is None or mean.op_type != "ReduceMean" or mean.attributes.get_int("keepdims", 1) != 1:
        return not_rms
    axes = constant(mean.inputs[1]) if len(mean.inputs) > 1 else None
    attr_axes = mean.attributes.get_ints("axes", None)
    if axes is None and attr_axes is not None:
        axes = np.asarray(attr_axes)
    if axes is None or axes.size != 1 or int(axes.ravel()[0]) != -1:
        return NoMatch(f"{mean.name} does not average over the last axis")
    add = _only_reader(mean.outputs[0])
    if add is None or add.op_type != "Add" or not any(
            (a := constant(v)) is not None and a.size == 1 for v in add.inputs):
        return not_rms
    sqrt = _only_reader(add.outputs[0])
    if sqrt is None or sqrt.op_type != "Sqrt":
        return not_rms
    step = _only_reader(sqrt.outputs[0])
    if step is None:
        return not_rms
    if step.op_type == "Div" and step.inputs[0] is x:  # x / sqrt(...)
        scale_node = step
    elif (step.op_type == "Reciprocal" or (step.op_type == "Div" and (one := constant(step.inputs[0])) is not None
                                           and one.size == 1 and float(one.ravel()[0]) == 1.0)):
        scale_node = _only_reader(step.outputs[0])
        if scale_node is None or scale_node.op_type != "Mul" or x not in scale_node.inputs:
            return NoMatch(f"{step.name}: the inverse RMS is not multiplied into the stream value")
    else:
        return not_rms
    return scale_node


def _is_fused_rms_norm(node: ir.Node) -> bool:
    """onnxruntime's SimplifiedLayerNormalization (registered in the ONNX domain): x / rms(x) * gamma."""
    return is_standard(node, "SimplifiedLayerNormalization")


def _is_skip_rms_norm(node: ir.Node) -> bool:
    """onnxruntime's SkipSimplifiedLayerNormalization: a residual Add and the next RMSNorm in one node."""
    return node.op_type == "SkipSimplifiedLayerNormalization" and node.domain == "com.microsoft"


def _used_outputs(node: ir.Node, indices: tuple[int, ...]) -> str:
    """A reason when one of the node's statistics outputs is read. The inverse RMS is unchanged by Q, but a mean
    over channels is not (mean(x Q) is not mean(x)), and their readers are not walked: refused, not proved."""
    for index in indices:
        if index < len(node.outputs) and (value_uses(out := node.outputs[index]) or out.is_graph_output()):
            return (f"{node.name or node.op_type} ({node.op_type}) output {index} '{out.name}' is read; only its "
                    "normalized output and the residual sum may be")
    return ""


def _match_fused_norm(node: ir.Node, hidden: int) -> Match[_Norm]:
    """SimplifiedLayerNormalization(x, gamma) reading stream value x: the same RMSNorm as the exported pattern
    (epsilon inside the root, stash_type only the precision of the statistics), gamma its weight."""
    name = node.name or node.op_type
    axis = node.attributes.get_int("axis", -1)
    if axis != -1 and (axis < 0 or _rank(node.inputs[0]) != axis + 1):
        return NoMatch(f"{name} normalizes from axis {axis}, not over the channels (the last axis) alone")
    return _fused_norm(node, hidden)


def _match_skip_norm(node: ir.Node, plan: _Plan) -> Match[_Norm]:
    """SkipSimplifiedLayerNormalization(input, skip, gamma[, bias]) as a residual Add and a norm: output 3 is
    input + skip + bias (the stream goes on from it), output 0 the RMSNorm of that sum times gamma (its
    readers take Q^T diag(gamma) W). A bias is a constant added to the stream, so it turns into b Q (it is
    recorded in `plan.biases`). The stream may be either of the first two inputs; the caller walks the other."""
    hidden = plan.hidden
    name = node.name or node.op_type
    if len(node.inputs) < 3:
        return NoMatch(f"{name} has no constant weight over the {hidden} channels")
    if len(node.inputs) > 3 and node.inputs[3] is not None:
        if not is_channel_vector(node, 3, hidden):
            return NoMatch(f"{name} adds a bias that is not a constant vector over the {hidden} channels")
        plan.biases.append((node, 3))
    return _fused_norm(node, hidden)


def _fused_norm(node: ir.Node, hidden: int) -> Match[_Norm]:
    """A fused RMSNorm node whose gamma is a constant, whose statistics outputs (mean, inverse std) nobody
    reads, and whose output 0 only linear layers read; which input and outputs those are: `FUSED_NORMS`."""
    weight = FUSED_NORMS[node.op_type].scale
    if not is_channel_vector(node, weight, hidden):
        return NoMatch(f"{node.name or node.op_type} has no constant weight over the {hidden} channels")
    reason = _used_outputs(node, FUSED_NORMS[node.op_type].statistics)
    if reason:
        return NoMatch(reason)
    readers = _norm_readers(node.outputs[0], hidden)
    if isinstance(readers, NoMatch):
        return readers
    return _Norm(node.outputs[0], (node, weight), readers, (node,))


def _norm_readers(value: ir.Value, hidden: int) -> Match[tuple[LinearLayer, ...]]:
    """Linear layers reading a norm output (directly, or through a Reshape that flattens the token axes)."""
    if value.is_graph_output():
        return NoMatch(f"the norm output '{value.name}' is a model output")
    readers: list[LinearLayer] = []
    frontier = [value]
    for current in frontier:
        for use in value_uses(current):
            node = use.node
            layer = as_linear_layer(node)
            if layer is not None and use.idx == 0 and layer.in_channels == hidden:
                readers.append(layer)
            elif node.op_type == "Reshape" and use.idx == 0 and current is value \
                    and not node.outputs[0].is_graph_output():
                # [.., C] -> [N, C] keeps each token's channels together when every reader reads C channels
                frontier.append(node.outputs[0])
            else:
                return NoMatch(f"{node.name or node.op_type} ({node.op_type}) reads the norm output '{current.name}'; "
                               "only linear layers with a constant weight can take the rotation")
    return tuple(readers)


def _walk_branch(start: ir.Value, add: ir.Node, plan: _Plan) -> str:
    """Collect the writers of what residual Add `add` adds to the stream; a reason when it is not linear in them."""
    hidden = plan.hidden
    stack = [start]
    while stack:
        value = stack.pop()
        node = value.producer()
        if node is None or not is_standard(node):
            return f"what {add.name} adds to the residual stream comes from '{value.name}', not from a linear layer"
        if len(value_uses(value)) != 1 or value.is_graph_output():
            return f"'{value.name}' on the branch into {add.name} has other readers; rotating it would change them"
        layer = as_linear_layer(node)
        op = node.op_type
        if layer is not None:
            if layer.out_channels != hidden:
                return f"{layer.name} writes {layer.out_channels} channels, not {hidden}"
            plan.writers.append(layer)
            if layer.bias_value is not None:
                if not is_channel_vector(node, 2, hidden, allow_scalar=True):
                    return f"{layer.name} has a bias that is not a vector over the {hidden} channels"
                plan.biases.append((node, 2))
        elif op == "Add" and len(node.inputs) == 2:
            const = [i for i in (0, 1) if is_constant(node.inputs[i])]
            if len(const) == 2:
                return f"{node.name} adds two constants on the branch into {add.name}"
            if const:
                if not _addable(node, const[0], hidden):
                    return f"{node.name} adds a constant that is not a vector over the {hidden} channels"
                plan.biases.append((node, const[0]))
            stack.extend(node.inputs[i] for i in (0, 1) if i not in const)  # type: ignore[misc]
        elif (op == "Reshape" or _is_float_cast(node)) and node.inputs[0] is not None:
            stack.append(node.inputs[0])
        elif op == "ConstantOfShape" and _is_zeros(node):
            continue
        elif op == "Mul" and len(node.inputs) == 2:
            weight = next((i for i in (1, 0) if is_channel_vector(node, i, hidden)), None)
            if weight is not None and _is_rms_normalized(node.inputs[1 - weight]):
                plan.post_norms.append((node, weight))  # Gemma 3: a norm between the writer and the Add
                continue
            factor = next((i for i in (1, 0) if _broadcasts_over_channels(node.inputs[i])), None)
            if factor is None:
                return (f"{node.name} multiplies the branch into {add.name} by something that varies over "
                        "channels; a rotation does not commute with it")
            stack.append(node.inputs[1 - factor])  # type: ignore[arg-type]
        else:
            return (f"what {add.name} adds to the residual stream comes from {node.name or op} ({op}), "
                    "not from a linear layer")
    return ""


def _addable(node: ir.Node, index: int, hidden: int) -> bool:
    array = constant(node.inputs[index])
    if array is not None and array.size == 1:
        return float(array.ravel()[0]) == 0.0
    return is_channel_vector(node, index, hidden)


def _is_zeros(node: ir.Node) -> bool:
    attr = node.attributes.get("value")
    if attr is None:
        return True
    tensor = attr.as_tensor()
    return not np.any(tensor.numpy())


def _is_rms_normalized(value: ir.Value | None) -> bool:
    """x / rms(x) as exported (through Casts): a Mul or Div that ends an `_rms_normalizer` chain from one of its
    inputs."""
    node = value.producer() if value is not None else None
    while node is not None and _is_float_cast(node) and node.inputs[0] is not None:
        node = node.inputs[0].producer()
    if node is None or node.op_type not in ("Mul", "Div"):
        return False
    return any(is_standard(use.node, "Pow") and use.idx == 0 and _rms_normalizer(use.node, x) is node
               for x in node.inputs if x is not None for use in x.uses())


def _broadcasts_over_channels(value: ir.Value | None) -> bool:
    """Whether `value` has last axis 1 (a per-token factor): a constant, a known shape, or a Slice of width 1
    over its input's last axis (Mixtral's router weight of one expert)."""
    if value is None:
        return False
    array = constant(value)
    if array is not None:
        return array.ndim == 0 or array.shape[-1] == 1
    if value.shape is not None and len(value.shape) and value.shape[-1] == 1:
        return True
    node = value.producer()
    if node is None or node.op_type != "Slice" or len(node.inputs) < 4:
        return False
    starts, ends, axes = (constant(v) for v in node.inputs[1:4])
    if starts is None or ends is None or axes is None or starts.size != 1 or axes.size != 1:
        return False
    if int(ends.ravel()[0]) - int(starts.ravel()[0]) != 1 or int(starts.ravel()[0]) < 0:
        return False
    axis = int(axes.ravel()[0])
    rank = _rank(node.inputs[0])
    return axis == -1 or (rank is not None and axis == rank - 1)


def _rank(value: ir.Value | None, depth: int = 0) -> int | None:
    """The rank of a value from its shape, or from its producer's inputs for the few ops a router uses."""
    if value is None or depth > 32:
        return None
    if value.shape is not None:
        return len(value.shape)
    array = constant(value)
    if array is not None:
        return array.ndim
    node = value.producer()
    if node is None:
        return None
    op = node.op_type
    if op == "Reshape":
        return _length(node.inputs[1])
    if op in ("Slice", "TopK", "Softmax", "ReduceSum", "ReduceMax", "ReduceMean") and (
            op not in ("ReduceSum", "ReduceMax", "ReduceMean") or node.attributes.get_int("keepdims", 1)):
        return _rank(node.inputs[0], depth + 1)
    if op in _ELEMENTWISE or op == "MatMul":
        ranks = [_rank(v, depth + 1) for v in node.inputs if v is not None]
        return None if not ranks or any(r is None for r in ranks) else max(r for r in ranks if r is not None)
    return None


def _length(shape: ir.Value | None) -> int | None:
    """Number of entries of a 1-D shape tensor: a constant, or a Concat of constants and unsqueezed scalars."""
    if shape is None:
        return None
    array = constant(shape)
    if array is not None:
        return int(array.size)
    node = shape.producer()
    if node is None or node.op_type != "Concat":
        return None
    total = 0
    for part in node.inputs:
        piece = constant(part)
        producer = part.producer() if part is not None else None
        if piece is not None:
            total += int(piece.size)
        elif producer is not None and producer.op_type == "Unsqueeze" and (
                (axes := constant(producer.inputs[1]) if len(producer.inputs) > 1 else None) is not None
                and axes.size == 1 and _rank(producer.inputs[0]) in (0, None)):
            total += 1
        else:
            return None
    return total


# --- R2: value heads ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _HeadPair:
    path: ColumnPath  # from the value projection (v_proj or a fused qkv_proj) to o_proj's input
    output: LinearLayer  # o_proj
    first: int  # first value column of path.layer
    kv_heads: int
    heads: int


def find_head_pairs(graph: ir.Graph, layout: HeadLayout | None) -> Match[tuple[list[_HeadPair], int]]:
    """Every attention output projection with the value columns behind it, and the head size; or why not."""
    pairs: list[_HeadPair] = []
    head_dim = layout.head_dim if layout is not None else 0
    for layer in find_linear_layers(graph):
        path = walk_to_linear(layer.activation, layer.in_channels, attention=True)
        fused: tuple[ColumnPath, int, int] | None = None  # GroupQueryAttention: value columns, head size, first
        if path is None:
            found = _fused_attention(layer)
            if isinstance(found, NoMatch):
                return found
            if found is None:
                continue
            fused = found
            path = found[0]
        if path.channel_adds:
            return NoMatch(f"{layer.name} reads its input through a bias Add; its rows cannot be rotated per head")
        size = fused[1] if fused is not None else _head_size(path)
        if size is None:
            return NoMatch(f"the head size between {path.layer.name} and {layer.name} is not a constant of the "
                           "graph")
        if head_dim and size != head_dim:
            return NoMatch(f"config.json says head_dim {head_dim}, but {path.layer.name} is reshaped into heads "
                           f"of {size}")
        head_dim = size
        if layer.in_channels % size:
            return NoMatch(f"{layer.name} reads {layer.in_channels} channels, not whole heads of {size}")
        heads = layer.in_channels // size
        if layout is not None and heads != layout.heads:
            return NoMatch(f"{layer.name} reads {heads} heads, config.json says {layout.heads}")
        first = fused[2] if fused is not None else _value_columns(path, layout, heads, size)
        if isinstance(first, NoMatch):
            return first
        kv_heads = (path.out_columns - first) // size
        if kv_heads <= 0 or heads % kv_heads:
            return NoMatch(f"{path.layer.name} has {kv_heads} value heads for {heads} query heads")
        pairs.append(_HeadPair(path, layer, first, kv_heads, heads))
    if not pairs:
        return NoMatch("no attention output projection reads value heads")
    return pairs, head_dim


def _fused_attention(layer: LinearLayer) -> Match[tuple[ColumnPath, int, int]] | None:
    """The value columns behind onnxruntime's GroupQueryAttention when `layer` reads its output (None when it
    does not). Its heads are the node's attributes and V is only mixed over tokens (RoPE turns q and k), as for
    smoothing (passes/absorbers/gqa.py); the value cache then holds V H and comes back as past in that basis.
    Only a projection whose columns reach the node unmoved is rotated: its column j is value channel j, and a
    bias Add on the way is in column order. Returns the path, the head size and the first value column."""
    node = layer.activation.producer()
    if node is None or node.op_type != "GroupQueryAttention":
        return None
    found = GroupQueryAttentionAbsorber.match(Site(layer.activation, layer.activation, layer.in_channels))
    if isinstance(found, NoMatch):
        return found if found.reason else None
    path = found.path
    if path.moves or path.out_columns != found.channels:
        return NoMatch(f"the value columns of {found.layer_name} are moved on their way into {node.name}")
    return replace(path, channel_adds=(), column_adds=path.channel_adds + path.column_adds), found.head_size, \
        found.offset


def _head_size(path: ColumnPath) -> int | None:
    """The last entry of the first Reshape on the path from the value columns (into [.., heads, head_dim])."""
    reshape = next((node for node, _, _ in path.moves if node.op_type == "Reshape"), None)
    if reshape is None or len(reshape.inputs) < 2:
        return None
    shape = reshape.inputs[1]
    array = constant(shape)
    if array is None and shape is not None and (concat := shape.producer()) is not None \
            and concat.op_type == "Concat" and concat.inputs:
        array = constant(concat.inputs[-1])
    if array is None or array.size == 0 or int(array.ravel()[-1]) <= 0:
        return None
    return int(array.ravel()[-1])


def _value_columns(path: ColumnPath, layout: HeadLayout | None, heads: int, size: int) -> Match[int]:
    """First value column of the projection: 0 for v_proj, past q and k for a fused qkv_proj (q, k, v order,
    checked against the Slice that cuts the value part out)."""
    columns = path.out_columns
    first_move = path.moves[0][0] if path.moves else None
    if first_move is None or first_move.op_type not in ("Slice", "Split"):
        return 0
    if layout is None:
        return NoMatch(f"{path.layer.name} is a fused projection; its value columns need config.json's head counts")
    start = (layout.heads + layout.kv_heads) * size
    if columns != (layout.heads + 2 * layout.kv_heads) * size:
        return NoMatch(f"{path.layer.name} has {columns} columns, not q, k and v of the configured heads")
    if first_move.op_type == "Slice":
        starts = constant(first_move.inputs[1])
        if starts is not None and starts.size == 1 and int(starts.ravel()[0]) == start:
            return start
    return NoMatch(f"{first_move.name} does not cut the value columns at {start} of {path.layer.name}")


# --- the rewrite ----------------------------------------------------------------------------------------


def _rotate_stream(graph: ir.Graph, plan: _Plan, q: Orthogonal) -> list[str]:
    """Apply R1; returns the names of the MatMuls added after post-norms. Weights are rotated when they are read
    (`graph.deferred`): a block of a large model holds only its own rotated weights."""
    hidden = plan.hidden
    for norm in plan.norms:
        scale = _norm_weight(norm, hidden)
        for layer in norm.readers:
            set_constant_input(graph, layer.node, 1, _rotated_rows(layer, q, scale), "_rotated")
        if norm.weight is not None:
            mul, index = norm.weight
            array = constant(mul.inputs[index])
            assert array is not None
            set_constant_input(graph, mul, index, np.ones((*array.shape[:-1], hidden), array.dtype), "_folded")
    for layer in plan.writers:
        set_constant_input(graph, layer.node, 1, _rotated_columns(layer.weight_value, 1 - layer.in_axis, q),
                           "_rotated")
    for node, index in plan.biases:
        array = constant(node.inputs[index])
        assert array is not None
        if array.size == 1:
            continue  # a zero
        set_constant_input(graph, node, index, rotate_columns(array, -1, q), "_rotated")
    for gather in plan.tables:
        assert gather.inputs[0] is not None
        set_constant_input(graph, gather, 0, _rotated_columns(gather.inputs[0], 1, q), "_rotated")
    return [_online_rotation(graph, mul, index, q) for mul, index in plan.post_norms]


def _rotated_rows(layer: LinearLayer, q: Orthogonal, scale: np.ndarray | None):  # -> Deferred
    source = layer.weight_value.const_value
    assert source is not None
    in_axis = layer.in_axis
    return deferred(source, lambda weight: rotate_rows(weight, in_axis, q, scale))


def _rotated_columns(value: ir.Value, out_axis: int, q: Orthogonal):  # -> Deferred
    assert value.const_value is not None
    return deferred(value.const_value, lambda weight: rotate_columns(weight, out_axis, q))


def _norm_weight(norm: _Norm, hidden: int) -> np.ndarray | None:
    if norm.weight is None:
        return None
    mul, index = norm.weight
    array = constant(mul.inputs[index])
    assert array is not None
    return np.broadcast_to(array.reshape(-1) if array.size > 1 else array.ravel(), (hidden,)).astype(np.float64)


def _online_rotation(graph: ir.Graph, mul: ir.Node, index: int, q: Orthogonal) -> str:
    """Replace a post-norm's Mul(x, w) by MatMul(x, diag(w) Q): nothing after it could take Q."""
    array = constant(mul.inputs[index])
    x = mul.inputs[1 - index]
    assert array is not None and x is not None
    name = f"{mul.name}_rotation" if mul.name else f"{mul.outputs[0].name}_rotation"
    weight = add_initializer(graph, f"{name}.weight", scaled_rotation(array.reshape(-1), q).astype(array.dtype))
    matmul = ir.Node("", "MatMul", [x, weight], name=name, num_outputs=1)
    matmul.outputs[0].name = f"{mul.outputs[0].name}_rotated"
    matmul.outputs[0].type = mul.outputs[0].type
    matmul.outputs[0].shape = mul.outputs[0].shape
    graph.insert_after(mul, matmul)
    mul.outputs[0].replace_all_uses_with(matmul.outputs[0])
    old_weight = mul.inputs[index]
    graph.remove(mul, safe=True)
    if old_weight is not None and old_weight.name in graph.initializers and not old_weight.uses() \
            and not old_weight.is_graph_output():
        graph.initializers.pop(old_weight.name)
    return name


def _rotate_heads(graph: ir.Graph, pair: _HeadPair, h: np.ndarray, head_dim: int) -> None:
    """R2: value columns of every KV head times H (and their biases), o_proj rows of every query head times H^T."""
    layer = pair.path.layer
    columns = block_diagonal(h, pair.kv_heads, size=pair.path.out_columns, offset=pair.first)
    set_constant_input(graph, layer.node, 1, _rotated_columns(layer.weight_value, 1 - layer.in_axis, columns),
                       "_rotated")
    biases = [(add, index) for add, index in pair.path.column_adds]
    if layer.bias_value is not None:
        biases.append((layer.node, 2))
    for node, index in biases:
        array = constant(node.inputs[index])
        assert array is not None
        if array.size > 1:
            set_constant_input(graph, node, index, rotate_columns(array, -1, columns), "_rotated")
        elif float(array.ravel()[0]) != 0.0:
            full = np.full(pair.path.out_columns, array.ravel()[0], array.dtype)
            set_constant_input(graph, node, index, rotate_columns(full, -1, columns), "_rotated")
    output = pair.output
    set_constant_input(graph, output.node, 1, _rotated_rows(output, block_diagonal(h, pair.heads), None), "_rotated")
