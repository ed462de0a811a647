"""Channel maps read off the running model: which column of a linear layer lands in each channel of a
later activation, after Reshape/Transpose/Split/Expand and attention have moved it around.

Head counts and layouts of fused projections hide in shape subgraphs (Concat of Shape outputs) that no
static reading recovers reliably, so the calibration graph carries, per probe, a labelled replay of the
moves: the layer's output times 0 plus the column index, through clones of the same nodes, which read
the same shape tensors and attention probabilities. Probabilities sum to 1, so a token mix of equal
labels is the label again. Labels go in two digits base 128 to stay exact in float32 sums.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from sqonnx.graph.tensors import add_initializer

LABEL_BASE = 128
TOLERANCE = 0.25  # |label - nearest integer| and spread across tokens must stay below this


@dataclass(frozen=True)
class Probe:
    """Label the `columns` output columns of `start` 0..columns-1, replay the channel-moving `moves`
    (node, live input index, live output index; `start`'s side first) and read which label lands in
    each of the `channels` channels of `target` (the last axis)."""

    name: str
    start: ir.Value
    columns: int
    moves: tuple[tuple[ir.Node, int, int], ...]
    target: ir.Value
    channels: int
    # Where the path splits a fused output (q/k/v, gate/up): (index of the move that reads the split value,
    # the other readers of that value). Their labels are read too, so the absorber can check that they
    # read none of the columns it divides.
    splits: tuple[tuple[int, tuple[tuple[ir.Node, int], ...]], ...] = ()


def add_probe(graph: ir.Graph, probe: Probe, index: int, axes_as_input: bool) -> tuple[list[ir.Node], list[ir.Value]]:
    """Append the replay of `probe` to `graph`; returns the nodes and the outputs to fetch: max and min
    over tokens of the low and high label digit, then the labels each other reader of a split reads."""
    nodes: list[ir.Node] = []
    outputs: list[ir.Value] = []
    columns = np.arange(probe.columns)
    flat_shape = add_initializer(graph, f"sqonnx_probe_{index}_shape", np.array([-1, probe.channels], np.int64))
    zero = add_initializer(graph, f"sqonnx_probe_{index}_zero", np.array(0.0, np.float32))

    def replay(base: str, labels: np.ndarray, steps: int) -> list[ir.Value]:
        """Labelled copies of the values the moves read and write: inputs of move 0..steps-1, then the last."""
        label = add_initializer(graph, f"{base}_labels", labels.astype(np.float32))
        cleared = ir.Node("", "Mul", [probe.start, zero], name=f"{base}_clear")
        labelled = ir.Node("", "Add", [cleared.outputs[0], label], name=f"{base}_label")
        nodes.extend([cleared, labelled])
        trail = [labelled.outputs[0]]
        for step, (node, live, out_index) in enumerate(probe.moves[:steps]):
            nodes.append(_clone(node, live, trail[-1], f"{base}_{step}_{node.op_type}"))
            trail.append(nodes[-1].outputs[out_index])
        return trail

    for digit, labels in (("low", columns % LABEL_BASE), ("high", columns // LABEL_BASE)):
        base = f"sqonnx_probe_{index}_{digit}"
        current = replay(base, labels, len(probe.moves))[-1]
        flat = ir.Node("", "Reshape", [current, flat_shape], name=f"{base}_flat")
        nodes.append(flat)
        for reduce in ("ReduceMax", "ReduceMin"):
            attributes: list[ir.Attr] = [ir.AttrInt64("keepdims", 0)]
            inputs = [flat.outputs[0]]
            if axes_as_input:
                inputs.append(add_initializer(graph, f"{base}_{reduce}_axes", np.array([0], np.int64)))
            else:
                attributes.append(ir.AttrInt64s("axes", [0]))
            node = ir.Node("", reduce, inputs, attributes, name=f"{base}_{reduce}")
            node.outputs[0].name = f"{base}_{reduce}_output"
            node.outputs[0].dtype = ir.DataType.FLOAT
            node.outputs[0].shape = ir.Shape([probe.channels])
            nodes.append(node)
            outputs.append(node.outputs[0])
    if probe.splits:
        # Moves only copy numbers, so one label per column stays exact (float32 holds integers to 2**24).
        base = f"sqonnx_probe_{index}_split"
        trail = replay(base, columns, max(step for step, _ in probe.splits))
        flat_all = add_initializer(graph, f"{base}_flat_shape", np.array([-1], np.int64))
        for step, readers in probe.splits:
            for number, (reader, live) in enumerate(readers):
                clone = _clone(reader, live, trail[step], f"{base}_{step}_{number}_{reader.op_type}")
                nodes.append(clone)
                for out in clone.outputs:
                    flat = ir.Node("", "Reshape", [out, flat_all], name=f"{clone.name}_{out.index()}_flat")
                    unique = ir.Node("", "Unique", [flat.outputs[0]], num_outputs=1,
                                     name=f"{clone.name}_{out.index()}_unique")
                    unique.outputs[0].name = f"{unique.name}_output"
                    unique.outputs[0].dtype = ir.DataType.FLOAT
                    nodes.extend([flat, unique])
                    outputs.append(unique.outputs[0])
    for node in nodes:
        for value in node.outputs:
            if value.name is None:
                value.name = f"{node.name}_output_{value.index()}"
    graph.extend(nodes)
    return nodes, outputs


def _clone(node: ir.Node, live: int, value: ir.Value, name: str) -> ir.Node:
    inputs = list(node.inputs)
    inputs[live] = value
    return ir.Node(node.domain, node.op_type, inputs, attributes=list(node.attributes.values()),
                   num_outputs=len(node.outputs), name=name)


def read_map(probe: Probe, low_max: np.ndarray, low_min: np.ndarray, high_max: np.ndarray,
             high_min: np.ndarray, *others: np.ndarray) -> np.ndarray | None:
    """The column behind each target channel, or None when the replay did not carry one clean label per
    channel (the path mixes channels, or the layout is not what the walk assumed), or when another reader
    of a split output reads one of those columns (dividing it would change that reader)."""
    digits = []
    for top, bottom in ((low_max, low_min), (high_max, high_min)):
        nearest = np.rint(top)
        if top.shape != (probe.channels,) or not np.all(np.isfinite(top)) or np.any(top - bottom > TOLERANCE) \
                or np.any(np.abs(top - nearest) > TOLERANCE):
            return None
        digits.append(nearest.astype(np.int64))
    columns = digits[1] * LABEL_BASE + digits[0]
    if np.any(columns < 0) or np.any(columns >= probe.columns):
        return None
    read_elsewhere = np.concatenate([np.rint(o).astype(np.int64) for o in others]) if others else np.zeros(0, int)
    if np.intersect1d(columns, read_elsewhere).size:
        return None
    return columns
