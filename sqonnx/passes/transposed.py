"""Weights read through a Transpose of a constant: tied LM heads, and onnxruntime-genai's embedding.

Exports that tie the LM head to the embedding keep one table and read it twice: optimum writes the head as
MatMul(x, Transpose(E)) (SmolLM2, OPT, GPT-2), onnxruntime-genai's builder the other way round (the head
holds the constant, the embedding Gather reads Transpose(W)). A MatMul whose weight is computed at run time
is no linear layer to smooth or quantize, so `FoldTransposedConstantsPass` (part of `prepare`) gives every
Transpose of a 2-D constant its own transposed initializer: the head becomes a plain linear layer (its INT8
copy is what the output keeps, 4x smaller than the float table), and the Gather keeps reading exact floats.

`RestoreTransposedCopiesPass` undoes it for copies that stayed float and unchanged (an excluded head), so a
model whose head is not quantized is not 113 MB bigger (SmolLM2's 49152 x 576 table) than its input. A head
that smoothing or rotation changed (--smooth-only folds the final norm into it) no longer equals the table
transposed and stays a copy of its own.

The copy is computed when it is read (`graph.deferred`): a model processed block by block holds a 32000 x 4096
head copy only while the head's block is worked on. The pass may run on one block of the model (see
`sqonnx.streaming.blocks`): the table then lives in another block, and the Transpose reads it by name.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from sqonnx.graph.match import is_standard
from sqonnx.graph.tensors import add_initializer, constant_shape, deferred


def _transpose_of_constant(node: ir.Node) -> bool:
    if not is_standard(node, "Transpose") or len(node.inputs) != 1:
        return False
    table = constant_shape(node.inputs[0])
    return table is not None and len(table[0]) == 2 and tuple(node.attributes.get_ints("perm", (1, 0))) == (1, 0)


# Value.meta keys (in memory only) on a folded copy: the table (Value) it was transposed from, and the tensor
# the fold made (a copy whose tensor is still that one is unchanged).
FOLDED_FROM = "sqonnx.transposed_from"
FOLDED_TENSOR = "sqonnx.transposed_tensor"


class FoldTransposedConstantsPass(ir.passes.InPlacePass):
    """Transpose(E) of a 2-D constant E -> an initializer `<E>_transposed` holding E^T. Each Transpose gets
    its own copy; a second run finds no Transpose of a constant left and changes nothing."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for node in list(graph):
            output = node.outputs[0]
            if not _transpose_of_constant(node) or output.is_graph_output():
                continue
            source = node.inputs[0]
            assert source is not None and source.const_value is not None
            rows, columns = source.const_value.shape
            folded = add_initializer(graph, f"{source.name}_transposed",
                                     deferred(source.const_value, lambda array: np.ascontiguousarray(array.T),
                                              (int(columns), int(rows))))
            folded.meta[FOLDED_FROM] = source
            folded.meta[FOLDED_TENSOR] = folded.const_value
            output.replace_all_uses_with(folded)
            graph.remove(node, safe=True)
            modified = True
        return ir.passes.PassResult(model, modified=modified)


class RestoreTransposedCopiesPass(ir.passes.InPlacePass):
    """A folded copy that stayed float and unchanged is read through a Transpose of the table again (the copy is
    dropped), when the table stays in the model anyway: an embedding Gather reads it. A copy that a fold, a
    rotation or the quantizer changed or replaced stays as it is."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for copy in list(graph.initializers.values()):
            table = copy.meta.get(FOLDED_FROM)
            if table is None or not copy.uses() or copy.is_graph_output() or copy.const_value is None:
                continue
            if copy.const_value is not copy.meta.get(FOLDED_TENSOR) or table.const_value is None \
                    or not any(use.node.op_type == "Gather" and use.idx == 0 for use in table.uses()):
                continue
            source = graph.initializers.get(str(table.name))
            if source is None:  # the table is in another block: the same tensor, by the same name
                source = ir.Value(name=str(table.name), shape=ir.Shape(table.const_value.shape),
                                  type=ir.TensorType(table.const_value.dtype), const_value=table.const_value)
                graph.register_initializer(source)
            transpose = ir.node("Transpose", [source], {"perm": [1, 0]}, name=f"{copy.name}/Transpose",
                                outputs=[ir.Value(name=f"{copy.name}_at_run_time")])
            transpose.outputs[0].dtype = copy.dtype
            transpose.outputs[0].shape = copy.shape
            graph.insert_before(next(iter(graph)), transpose)  # it reads an initializer only
            copy.replace_all_uses_with(transpose.outputs[0])
            graph.initializers.pop(str(copy.name))
            modified = True
        return ir.passes.PassResult(model, modified=modified)
