"""Give every value an element type, so any block of the graph can be run as a model of its own.

A block's inputs are values of the full graph, and onnxruntime refuses a model input without a type; exports
type their inputs and outputs but rarely what lies between (onnx's shape inference stops at onnxruntime's
contrib ops, which onnxruntime-genai's graphs are made of). The element type follows from a few rules: most
ops give their first input's type, a handful give a fixed one (Shape: int64, comparisons: bool, Cast: its
`to`), a few read it elsewhere (Where: its second input, DequantizeLinear: its scale). Values that already
have a type keep it; a value whose type the rules cannot tell stays without one.
"""

from __future__ import annotations

import onnx_ir as ir

_INT64_OPS = ("Shape", "Size", "NonZero", "ArgMax", "ArgMin", "NonMaxSuppression")
_BOOL_OPS = ("Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor", "Not", "IsNaN", "IsInf")
_NORMS = ("LayerNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization",
          "SkipSimplifiedLayerNormalization")
_D = ir.DataType


class InferDtypesPass(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for node in model.graph:
            types = output_dtypes(node)
            for out, dtype in zip(node.outputs, types, strict=False):
                if out.dtype is None and dtype is not None:
                    out.dtype = dtype
                    modified = True
        return ir.passes.PassResult(model, modified=modified)


def output_dtypes(node: ir.Node) -> list[ir.DataType | None]:
    """The element type of each output of `node`, from its inputs and attributes (None: unknown)."""
    op, count = node.op_type, len(node.outputs)
    if any(attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for attr in node.attributes.values()):
        return [None] * count  # If / Loop / Scan: their outputs are their subgraphs' (left as they are)
    inputs = [v.dtype if v is not None else None for v in node.inputs]
    first = next((t for t in inputs if t is not None), None)

    def input_type(index: int) -> ir.DataType | None:
        return inputs[index] if index < len(inputs) else None

    if op == "Cast" and "to" in node.attributes:
        return [_D(node.attributes.get_int("to", 0))]
    if op == "CastLike":
        return [input_type(1)]
    if op in _INT64_OPS:
        return [_D.INT64] * count
    if op in _BOOL_OPS:
        return [_D.BOOL] * count
    if op in ("Constant", "ConstantOfShape"):
        attr = node.attributes.get("value")
        return [attr.as_tensor().dtype if attr is not None else _D.FLOAT]
    if op == "Where":
        return [input_type(1)]
    if op == "DequantizeLinear":
        return [input_type(1)]
    if op == "QuantizeLinear":
        return [input_type(2) or _D.UINT8]
    if op == "DynamicQuantizeLinear":
        return [_D.UINT8, _D.FLOAT, _D.UINT8]
    if op in ("MatMulInteger", "ConvInteger"):
        return [_D.INT32]
    if op in ("MatMulIntegerToFloat", "DynamicQuantizeMatMul"):
        return [input_type(2)]
    if op == "Dropout":
        return [input_type(0), _D.BOOL][:count]
    if op in ("TopK", "Unique"):
        return [input_type(0), *[_D.INT64] * (count - 1)]
    if op == "OneHot":
        return [input_type(2)]
    if op in _NORMS:
        # normalized output (and the residual sum of the Skip* forms) in the input's type, statistics in float
        return [input_type(0) if i in (0, 3) else _D.FLOAT for i in range(count)]
    return [first] * count
