"""Move a graph to another ai.onnx opset where every op it uses means the same there: the GPU targets' window.

TensorRT 10's parser reads up to opset 20 and onnxruntime-genai's builder writes 21; Q/DQ in float16 or bfloat16
(what a GPU target writes for a half-precision model: `targets.rules.TargetRules.half_qdq`) needs 19, and optimum
exports 14 to 18. Between those versions almost every change to an op a transformer graph uses only added types or
an attribute or input whose default keeps the old meaning (`_SAME_MEANING`); the exceptions, opset 18 moving the
Reduce ops' `axes` from an attribute to an input and wanting an equal Split's output count as `num_outputs`, are
rewritten. So the graph is moved by relabelling its import (and
that rewrite), nothing else: no weight is read, which keeps a 7B model's load flat. An op whose meaning did change
(RoiAlign 16, DFT 20, GroupNormalization 21, ...), or 4-bit types and blocked Q/DQ when going below 21, are refused
with the node named, and the user converts with onnx's version converter instead.
"""

from __future__ import annotations

import numpy as np
import onnx.defs
import onnx_ir as ir

from sqonnx.errors import SqonnxError
from sqonnx.graph.match import STANDARD_DOMAINS
from sqonnx.graph.tensors import opset_version

# Q/DQ take float16 and bfloat16 inputs and scales from this opset (QuantizeLinear-19, DequantizeLinear-19).
HALF_QDQ_OPSET = 19

# Per opset, the ops whose change there keeps every graph that was valid before meaning the same (new types, or new
# attributes and inputs whose defaults are the old behaviour), checked against onnx's operator changelog.
_SAME_MEANING: dict[int, frozenset[str]] = {
    14: frozenset({"Add", "Sub", "Mul", "Div", "Relu", "Identity", "CumSum", "Reshape", "GRU", "LSTM", "RNN",
                   "BatchNormalization"}),
    15: frozenset({"Pow", "Shape", "BatchNormalization", "OptionalGetElement", "OptionalHasElement"}),
    16: frozenset({"GreaterOrEqual", "LessOrEqual", "Identity", "If", "Loop", "Scan", "LeakyRelu", "PRelu",
                   "ScatterElements", "ScatterND", "Where"}),
    18: frozenset({"LpPool", "OptionalGetElement", "OptionalHasElement", "Pad", "Resize", "ScatterElements",
                   "ScatterND", "Split"}),
    19: frozenset({"AveragePool", "Cast", "CastLike", "Constant", "DequantizeLinear", "Equal", "Identity", "If",
                   "Loop", "Pad", "QuantizeLinear", "Reshape", "Resize", "Scan", "Shape", "Size"}),
    20: frozenset({"ConstantOfShape", "IsInf", "IsNaN", "ReduceMax", "ReduceMin"}),
    21: frozenset({"Cast", "CastLike", "Constant", "ConstantOfShape", "DequantizeLinear", "Flatten", "Identity", "If",
                   "Loop", "Pad", "QuantizeLinear", "Reshape", "Scan", "Shape", "Size", "Squeeze", "Transpose",
                   "Unsqueeze"}),
}
# Opset 18: `axes` became an input of these (ReduceSum's moved in 13).
_AXES_TO_INPUT = 18
_REDUCE_OPS = frozenset({"ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
                         "ReduceMin", "ReduceProd", "ReduceSumSquare"})
# What opset 21 added that a graph going below it must not use.
_FOUR_BIT = frozenset({ir.DataType.INT4, ir.DataType.UINT4, ir.DataType.FLOAT4E2M1})


class SetOpsetPass(ir.passes.InPlacePass):
    """Relabel the model's ai.onnx opset as `version` (rewriting the Reduce ops' axes going up past 18); raises
    SqonnxError naming the first node whose op means something else there."""

    def __init__(self, version: int, why: str) -> None:
        super().__init__()
        self.version = version
        self.why = why  # for the refusal: what needs that opset

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        source = opset_version(model.graph)
        if source == self.version:
            return ir.passes.PassResult(model, modified=False)
        graphs: list[ir.Graph | ir.Function] = [model.graph, *model.functions.values()]
        nodes = [node for graph in graphs for node in ir.traversal.RecursiveGraphIterator(graph)
                 if node.domain in STANDARD_DOMAINS]
        for node in nodes:
            problem = _change(node, source, self.version)
            if problem:
                raise SqonnxError(f"the model uses opset {source}; {self.why}, and {node.name or node.op_type} "
                                  f"({node.op_type}) {problem}: convert the model with "
                                  f"onnx.version_converter.convert_version(model, {self.version}) first")
        if source < _AXES_TO_INPUT <= self.version:
            for node in nodes:
                if node.op_type in _REDUCE_OPS:
                    _axes_as_input(node)
                elif node.op_type == "Split" and (len(node.inputs) < 2 or node.inputs[1] is None):
                    # an equal split by its output count: opset 18 wants that count said (num_outputs)
                    node.attributes["num_outputs"] = ir.AttrInt64("num_outputs", len(node.outputs))
        for graph in graphs:
            for domain in STANDARD_DOMAINS:
                if domain in graph.opset_imports:
                    graph.opset_imports[domain] = self.version
        model.opset_imports.update({d: self.version for d in STANDARD_DOMAINS if d in model.opset_imports})
        return ir.passes.PassResult(model, modified=True)


def _change(node: ir.Node, source: int, target: int) -> str | None:
    """Why `node` would mean something else at `target` (None: it means the same)."""
    low, high = sorted((source, target))
    if not onnx.defs.has(node.op_type, ""):
        return None  # not an ONNX op: one onnxruntime registers in the standard domain (SimplifiedLayerNormalization)
    try:
        since = {onnx.defs.get_schema(node.op_type, version, "").since_version for version in range(low, high + 1)}
    except onnx.defs.SchemaError:
        return f"has no definition in opset {low}"
    for version in sorted(v for v in since if v > low):
        rewritten = version == _AXES_TO_INPUT and node.op_type in _REDUCE_OPS and source < target
        if not rewritten and node.op_type not in _SAME_MEANING.get(version, frozenset()):
            return f"changed meaning in opset {version}"
    if target < 21 <= source:
        types = {v.dtype for v in (*node.inputs, *node.outputs) if v is not None}
        if types & _FOUR_BIT:
            return "uses a 4-bit type, which came in opset 21"
        if node.attributes.get_int("block_size", 0) or "output_dtype" in node.attributes:
            return "uses blocked quantization (block_size, output_dtype), which came in opset 21"
    return None


def _axes_as_input(node: ir.Node) -> None:
    """ReduceX(x, axes=[...]) -> ReduceX(x, Constant([...])): the form opset 18 reads. Without the attribute the op
    reduces every axis in both forms."""
    axes = node.attributes.pop("axes", None)
    if axes is None:
        return
    graph = node.graph
    assert graph is not None
    base = node.name or str(node.outputs[0].name)
    constant = ir.node("Constant", [], {"value": ir.tensor(np.array(axes.as_ints(), np.int64))},
                       name=f"{base}/axes", outputs=[ir.Value(name=f"{base}/axes")])
    constant.outputs[0].dtype = ir.DataType.INT64
    graph.insert_before(node, constant)
    node.resize_inputs(2)
    node.replace_input_with(1, constant.outputs[0])
