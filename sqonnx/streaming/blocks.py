"""Cut a transformer graph into blocks along its residual stream, so a model is processed one block at a time.

Memory then follows the largest block instead of the model: each block is calibrated in an onnxruntime
session of its own, fed the values that cross into it (the residual stream, and what every layer reads
besides it: attention mask, rotary tables, position ids), then smoothed, quantized and written out before
the next one starts.

Where a cut may go is read off the graph, the same way for RMSNorm and LayerNorm decoders, optimum exports
and onnxruntime-genai's fused graphs, with no per-family rule. A cut before node p (in graph order, which
ONNX keeps topological) splits the nodes in two; what crosses it are the values made before p and read
from p on. Values that depend on the hidden states (everything downstream of the embedding Gather or of a
float model input, through data, not through Shape) are the expensive ones to carry; the rest (mask,
rotary tables, position ids) are computed once per sample and carried along as they are. A cut is allowed
where

* one hidden-state value crosses it, the stream itself (after a residual Add, before the norm that reads
  it); in a graph with onnxruntime's fused Skip*LayerNormalization, which adds and normalizes in one node so
  that the stream never exists alone, two: the stream and the branch about to be added to it; and
* it separates no smoothing group from the node that absorbs its 1/s: from the absorber (a norm, up_proj,
  v_proj, GroupQueryAttention's packed projection) to the group's last linear layer the graph stays in one
  block, so every fold is made, and every channel map measured, inside one block.

Between allowed cuts lie segments (half a decoder layer, typically); consecutive segments are merged while
their weights stay within the block budget (`QuantizeConfig.block_bytes`). A graph with no allowed cut is
one block (today's whole-model path), and `Partition.reason` says why.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from sqonnx.graph.match import is_standard
from sqonnx.graph.tensors import HALF_TYPES
from sqonnx.passes.absorbers.base import SHAPE_ONLY_OPS
from sqonnx.passes.smoothing_groups import find_smoothing_groups

# Hidden-state values that may cross a cut: the stream; with fused Skip*LayerNormalization (residual Add and
# norm in one node) the stream and the branch it adds next.
MAX_CROSSING = 1
MAX_CROSSING_FUSED = 2
# Constants smaller than this (shapes, axes, epsilons) are not weights: a block must hold weights to be a block.
WEIGHT_BYTES = 1024
SKIP_NORMS = ("SkipSimplifiedLayerNormalization", "SkipLayerNormalization")
_INTEGERS = (ir.DataType.INT64, ir.DataType.INT32, ir.DataType.INT8, ir.DataType.UINT8, ir.DataType.BOOL)


@dataclass
class Block:
    """A run of nodes (graph order) processed together, and what crosses its borders (value names)."""

    index: int
    nodes: list[ir.Node]
    weight_bytes: int
    inputs: list[str] = field(default_factory=list)  # read here, made by an earlier block or a graph input
    outputs: list[str] = field(default_factory=list)  # made here, read by a later block or a graph output
    label: str = ""
    shape_only: set[str] = field(default_factory=set)  # inputs this block reads only through Shape / Size


@dataclass
class Partition:
    blocks: list[Block]
    reason: str = ""  # why the graph is one block ("" when it was cut)
    graph_outputs: list[str] = field(default_factory=list)  # the model's outputs, in order

    @property
    def total_bytes(self) -> int:
        return sum(block.weight_bytes for block in self.blocks)

    def last_reader(self) -> dict[str, int]:
        """Value name -> index of the last block that reads it from outside (carried values die there)."""
        last: dict[str, int] = {}
        for block in self.blocks:
            for name in block.inputs:
                last[name] = block.index
        return last


def partition(graph: ir.Graph, budget: int) -> Partition:
    """Blocks of at most `budget` bytes of weights each (a segment between allowed cuts may exceed it)."""
    nodes = list(graph)
    if any(attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
           for node in nodes for attr in node.attributes.values()):
        return _one_block(graph, nodes, "the graph has control flow (If/Loop/Scan)")
    position = {id(node): i for i, node in enumerate(nodes)}
    hidden = _hidden_state_values(graph, nodes)
    last_use: dict[int, int] = {}
    for i, node in enumerate(nodes):
        for value in node.inputs:
            if value is not None and id(value) in hidden:
                last_use[id(value)] = i
    steps = np.zeros(len(nodes) + 2, np.int64)
    for i, node in enumerate(nodes):
        for out in node.outputs:
            end = last_use.get(id(out))
            if end is not None and end > i:
                steps[i + 1] += 1  # crosses every cut before nodes i+1 .. end
                steps[end + 1] -= 1
    crossing = np.cumsum(steps)[:len(nodes) + 1]
    fused = any(node.op_type in SKIP_NORMS for node in nodes)
    allowed = crossing <= (MAX_CROSSING_FUSED if fused else MAX_CROSSING)
    allowed[0] = allowed[len(nodes)] = False
    for start, end in _absorber_spans(graph, position):
        allowed[start + 1:end + 1] = False
    # Weights are counted as float32: a half-precision block is calibrated as its float32 upcast, so a budget in
    # float32 bytes keeps memory the same whatever the model's float type.
    cumulative = np.zeros(len(nodes) + 1, np.int64)
    stored = np.zeros(len(nodes) + 1, np.int64)  # the bytes as they are (what the block reports)
    seen: set[int] = set()
    for i, node in enumerate(nodes):
        added = real = 0
        for value in node.inputs:
            tensor = value.const_value if value is not None and value.is_initializer() else None
            if tensor is not None and id(value) not in seen and tensor.nbytes >= WEIGHT_BYTES:
                seen.add(id(value))
                real += tensor.nbytes
                added += tensor.nbytes * (2 if tensor.dtype in HALF_TYPES else 1)
        cumulative[i + 1] = cumulative[i] + added
        stored[i + 1] = stored[i] + real
    cuts = _choose_cuts(allowed, crossing, cumulative, budget)
    if not cuts:
        reason = "no cut along a residual stream: every place where one hidden-state value crosses lies inside a " \
                 "smoothing group" if not allowed.any() else f"the whole model fits in one block ({budget >> 20} MB)"
        return _one_block(graph, nodes, reason)
    bounds = [0, *cuts, len(nodes)]
    blocks = [Block(i, nodes[a:b], int(stored[b] - stored[a])) for i, (a, b) in enumerate(itertools.pairwise(bounds))]
    return Partition(_link(graph, blocks), graph_outputs=[str(v.name) for v in graph.outputs])


def follow(part: Partition, graph: ir.Graph) -> Partition | None:
    """`part`'s borders in another graph that computes the same values under the same names (a model's quantized
    output: sqonnx links its blocks by those names, Q/DQ tools keep them): block i holds the nodes, not in an
    earlier block, that block i's border values depend on, in graph order; nodes nothing reads go last. None where a
    border value is not in `graph` (a constant may have become an initializer there: blocks read those directly), or
    where `graph` has control flow (a branch reads outer values no node input names)."""
    nodes = list(graph)
    if any(attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
           for node in nodes for attr in node.attributes.values()):
        return None
    producer = {str(out.name): node for node in nodes for out in node.outputs}
    owner: dict[int, int] = {}
    for block in part.blocks:
        stack = [name for name in block.outputs
                 if name not in {str(v.name) for v in graph.inputs} and name not in graph.initializers]
        if any(name not in producer for name in stack):
            return None
        while stack:
            node = producer.get(stack.pop())
            if node is None or id(node) in owner:
                continue
            owner[id(node)] = block.index
            stack.extend(str(v.name) for v in node.inputs if v is not None and not v.is_initializer())
    last = part.blocks[-1].index
    blocks = [Block(block.index, [n for n in nodes if owner.get(id(n), last) == block.index], 0)
              for block in part.blocks]
    for block in blocks:
        block.weight_bytes = initializer_bytes(block_initializers(block))
    return Partition(_link(graph, blocks), graph_outputs=[str(v.name) for v in graph.outputs])


def block_initializers(block: Block) -> list[ir.Value]:
    """The initializers `block`'s nodes read, once each."""
    found: dict[int, ir.Value] = {}
    for node in block.nodes:
        for value in node.inputs:
            if value is not None and value.is_initializer():
                found.setdefault(id(value), value)
    return list(found.values())


def initializer_bytes(values: Iterable[ir.Value]) -> int:
    """The bytes of the values' constant tensors, as stored (external data is not read)."""
    return sum(v.const_value.nbytes for v in values if v.const_value is not None)


def _one_block(graph: ir.Graph, nodes: list[ir.Node], reason: str) -> Partition:
    weights = initializer_bytes(graph.initializers.values())
    return Partition(_link(graph, [Block(0, nodes, weights)]), reason, [str(v.name) for v in graph.outputs])


def _hidden_state_values(graph: ir.Graph, nodes: list[ir.Node]) -> set[int]:
    """ids of the values that depend, through data, on a float model input or an embedding lookup."""
    hidden: set[int] = {id(v) for v in graph.inputs if v.dtype is not None and v.dtype not in _INTEGERS}
    for node in nodes:
        if is_standard(node, *SHAPE_ONLY_OPS):
            continue
        table = node.inputs[0] if node.op_type == "Gather" and node.inputs else None
        embedding = table is not None and table.is_initializer() and table.dtype not in _INTEGERS
        if embedding or any(v is not None and id(v) in hidden for v in node.inputs):
            hidden.update(id(out) for out in node.outputs)
    return hidden


def _absorber_spans(graph: ir.Graph, position: dict[int, int]) -> list[tuple[int, int]]:
    """(absorber position, last reader position) of every smoothing group with an absorber."""
    spans = []
    for group in find_smoothing_groups(graph):
        if group.absorber is None:
            continue
        start = position.get(id(group.absorber.node))
        ends = [position[id(layer.node)] for layer in group.layers if id(layer.node) in position]
        if start is not None and ends:
            spans.append((min(start, *ends), max(start, *ends)))
    return spans


def _choose_cuts(allowed: np.ndarray, crossing: np.ndarray, cumulative: np.ndarray, budget: int) -> list[int]:
    """Greedy: from each block start, the allowed cut with (nearly) the most weight within the budget, fewest
    crossing values first; the first allowed cut when even that exceeds the budget. A cut that would leave a
    block without weights is skipped."""
    candidates = np.flatnonzero(allowed)
    cuts: list[int] = []
    start = 0
    total = int(cumulative[-1])
    while total - cumulative[start] > budget:
        after = candidates[candidates > start]
        after = after[cumulative[after] > cumulative[start]]  # a block must hold weights
        after = after[cumulative[after] < total]  # so must the rest
        if after.size == 0:
            return cuts
        within = after[cumulative[after] - cumulative[start] <= budget]
        if within.size == 0:
            cut = int(after[0])
        else:
            # Nearly as much weight counts as much: the few bytes of a norm's constants must not pull a cut from
            # after a residual Add (the stream alone) into the norm (the stream and a statistic).
            best = cumulative[within].max()
            near = within[cumulative[within] >= best - max(budget // 64, 1 << 16)]
            fewest = near[crossing[near] == crossing[near].min()]
            cut = int(fewest[cumulative[fewest] == cumulative[fewest].max()][-1])
        cuts.append(cut)
        start = cut
    return cuts


def _link(graph: ir.Graph, blocks: list[Block]) -> list[Block]:
    """Fill in what crosses each block's borders, and a label."""
    owner = {id(node): block.index for block in blocks for node in block.nodes}
    outputs = {id(v) for v in graph.outputs}
    for block in blocks:
        inputs: dict[str, None] = {}
        made: dict[str, None] = {}
        for node in block.nodes:
            for value in node.inputs:
                if value is None or value.is_initializer():
                    continue
                producer = value.producer()
                if producer is None or owner.get(id(producer)) != block.index:
                    inputs[str(value.name)] = None
            for out in node.outputs:
                if id(out) in outputs or any(owner.get(id(use.node)) != block.index for use in out.uses()):
                    made[str(out.name)] = None
        block.inputs, block.outputs = list(inputs), list(made)
        block.label = _label(block.nodes)
        readers: dict[str, set[str]] = {}
        for node in block.nodes:
            for value in node.inputs:
                if value is not None and str(value.name) in inputs:
                    readers.setdefault(str(value.name), set()).add(node.op_type)
        block.shape_only = {name for name, ops in readers.items() if ops <= set(SHAPE_ONLY_OPS)}
    return blocks


_LAYER = re.compile(r"layers?[._/](\d+)|\.h\.(\d+)|blocks?[._](\d+)|layer\.(\d+)")


def _label(nodes: list[ir.Node]) -> str:
    """'layers 3-5' from node names where exporters number the layers; else the first and last node."""
    numbers = sorted({int(next(g for g in m.groups() if g is not None)) for node in nodes
                      if node.name and (m := _LAYER.search(node.name))})
    if numbers:
        return f"layer {numbers[0]}" if numbers[0] == numbers[-1] else f"layers {numbers[0]}-{numbers[-1]}"
    return f"{nodes[0].name or nodes[0].op_type} .. {nodes[-1].name or nodes[-1].op_type}" if nodes else "empty"
