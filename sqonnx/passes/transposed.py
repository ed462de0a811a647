"""Weights read through a Transpose of a constant: tied LM heads, and onnxruntime-genai's embedding.

Exports that tie the LM head to the embedding keep one table and read it twice: optimum writes the head as
MatMul(x, Transpose(E)) (SmolLM2, OPT, GPT-2), onnxruntime-genai's builder the other way round (the head
holds the constant, the embedding Gather reads Transpose(W)). A MatMul whose weight is computed at run time
is no linear layer to smooth or quantize, so `FoldTransposedConstantsPass` (part of `prepare`) gives every
Transpose of a 2-D constant its own transposed initializer: the head becomes a plain linear layer (its INT8
copy is what the output keeps, 4x smaller than the float table), and the Gather keeps reading exact floats.

`RestoreTransposedCopiesPass` undoes it for copies that stayed float (an excluded head, --smooth-only), so a
model whose head is not quantized is not 113 MB bigger (SmolLM2's 49152 x 576 table) than its input.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from sqonnx.graph import add_initializer, constant


def _transpose_of_constant(node: ir.Node) -> np.ndarray | None:
    if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 1:
        return None
    table = constant(node.inputs[0])
    if table is None or table.ndim != 2 or tuple(node.attributes.get_ints("perm", (1, 0))) != (1, 0):
        return None
    return table


class FoldTransposedConstantsPass(ir.passes.InPlacePass):
    """Transpose(E) of a 2-D constant E -> an initializer `<E>_transposed` holding E^T (same value everywhere)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for node in list(graph):
            table = _transpose_of_constant(node)
            output = node.outputs[0]
            if table is None or output.is_graph_output():
                continue
            source = node.inputs[0]
            assert source is not None
            folded = add_initializer(graph, f"{source.name}_transposed", table.T)
            output.replace_all_uses_with(folded)
            graph.remove(node, safe=True)
            modified = True
        return ir.passes.PassResult(model, modified=modified)


class RestoreTransposedCopiesPass(ir.passes.InPlacePass):
    """A float initializer that still equals another one transposed is read through a Transpose again.

    Matched on content, not names: only initializers of transposed shapes are compared, and only while both
    are unchanged (a fold or a rotation that touched either one makes them differ)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        by_shape: dict[tuple[int, ...], list[ir.Value]] = {}
        for value in graph.initializers.values():
            tensor = value.const_value
            if tensor is not None and len(tensor.shape) == 2 and tensor.dtype == ir.DataType.FLOAT:
                by_shape.setdefault(tuple(tensor.shape.numpy()), []).append(value)
        modified = False
        for shape, copies in list(by_shape.items()):
            tables = by_shape.get(shape[::-1], [])
            if shape[0] == shape[1] or not tables:
                continue
            for copy in copies:
                if copy.is_graph_input() or copy.is_graph_output() or not copy.uses():
                    continue
                array = copy.const_value.numpy()  # type: ignore[union-attr]
                table = next((t for t in tables if t.uses() and _is_transpose_of(t.const_value.numpy(), array)),  # type: ignore[union-attr]
                             None)
                if table is None:
                    continue
                transpose = ir.node("Transpose", [table], {"perm": [1, 0]}, name=f"{table.name}/Transpose",
                                    outputs=[ir.Value(name=f"{table.name}_transposed_at_run_time")])
                transpose.outputs[0].dtype, transpose.outputs[0].shape = ir.DataType.FLOAT, ir.Shape(shape)
                graph.insert_before(next(iter(graph)), transpose)  # it reads an initializer only
                copy.replace_all_uses_with(transpose.outputs[0])
                graph.initializers.pop(str(copy.name))
                modified = True
        return ir.passes.PassResult(model, modified=modified)


def _is_transpose_of(table: np.ndarray, array: np.ndarray) -> bool:
    # A first row against a first column rules out almost every pair before the whole comparison.
    return bool(np.array_equal(table[:, 0], array[0]) and np.array_equal(table.T, array))
