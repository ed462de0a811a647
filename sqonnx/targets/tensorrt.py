"""What TensorRT's ONNX parser builds an INT8 engine from, checked statically (TensorRT cannot run here).

TensorRT takes explicit quantization as Q/DQ pairs (onnx-tensorrt's importer and TensorRT's "explicit
quantization" rules): int8 with zero points 0 (uint8 is refused), positive constant scales, one scale per
activation tensor, and per-channel weight scales along one axis (opset 13 and later). It has no kernel for
onnxruntime's integer ops (MatMulInteger, DynamicQuantizeLinear, QLinearMatMul, MatMulIntegerToFloat,
MatMulNBits and their kind), so a per-token (O1) or dynamic group has no TensorRT form: `--target tensorrt`
makes every group static and leaves float (the model's type, which TensorRT mixes freely with INT8) only the layers
where that costs more than the budget (`QuantizeConfig.float_budget`). TensorRT 10's parser reads
ai.onnx up to opset 20. Its Q/DQ scales may be float32, float16 or bfloat16, the type of the tensor quantized
(onnx-tensorrt's QuantizeLinear/DequantizeLinear importers): an FP16 or BF16 model keeps its own type all through,
which needs opset 19 (QuantizeLinear-19 took half types). `violation` names the first node of a graph that breaks one
of these rules.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from sqonnx.graph.match import is_standard
from sqonnx.graph.tensors import constant
from sqonnx.targets.rules import Target, TargetRules

MAX_OPSET = 20
# onnxruntime's integer and contrib quantization ops: no TensorRT importer for any of them
INTEGER_OPS = {"DynamicQuantizeLinear", "MatMulInteger", "QLinearMatMul", "MatMulIntegerToFloat",
               "DynamicQuantizeMatMul", "QGemm", "MatMulNBits", "ConvInteger", "QLinearConv", "QAttention",
               "DynamicQuantizeLSTM"}
QDQ = {"QuantizeLinear", "DequantizeLinear"}
SCALE_DTYPES = (np.dtype(np.float32), np.dtype(np.float16), np.dtype(ir.DataType.BFLOAT16.numpy()))


def violation(graph: ir.Graph, opset: int) -> str | None:
    """The first rule of TensorRT's INT8 import `graph` breaks, naming the node; None when every Q/DQ meets them."""
    if opset > MAX_OPSET:
        return f"ai.onnx opset {opset}: TensorRT 10's parser reads up to {MAX_OPSET}"
    for node in graph:
        name = node.name or node.op_type
        standard = is_standard(node)
        if node.op_type in INTEGER_OPS or (node.op_type in QDQ and not standard):
            return f"{name}: {'' if standard else node.domain + '.'}{node.op_type} has no TensorRT importer"
        if node.op_type not in QDQ:
            continue
        found = _qdq_violation(node)
        if found:
            return f"{name} ({node.op_type}): {found}"
    return None


def count_qdq(graph: ir.Graph) -> int:
    return sum(node.op_type in QDQ for node in graph)


def _qdq_violation(node: ir.Node) -> str | None:
    inputs = list(node.inputs) + [None] * (3 - len(node.inputs))
    data, scale_value, zero_value = inputs[:3]
    scale = constant(scale_value)
    if scale is None:
        return "its scale is not a constant"
    if scale.dtype not in SCALE_DTYPES or not np.all(scale.astype(np.float32) > 0):
        return "scales must be positive float constants"
    if zero_value is None:
        return "no zero point: the quantized type defaults to uint8, which TensorRT refuses (int8 only)"
    zero = constant(zero_value)
    if zero is None or zero.dtype != np.int8:
        return "its zero point must be a constant int8 (uint8 and others are refused)"
    if np.any(zero != 0):
        return "its zero point must be 0 (TensorRT's int8 is symmetric)"
    if node.attributes.get_int("block_size", 0):
        return "blocked quantization (block_size) has no TensorRT form"
    codes = constant(data) if node.op_type == "DequantizeLinear" else None
    weight = codes is not None
    if codes is not None and codes.dtype != np.int8:
        return f"weight codes must be int8, not {codes.dtype}"
    if scale.size > 1 and not weight:
        return "an activation needs one scale per tensor (per-channel and per-token scales are weights' only)"
    if scale.size > 1 and scale.ndim != 1:
        return "per-channel weight scales must be one-dimensional, along `axis`"
    return None


def _describe(checked: int, _quantized: int, kept: str) -> str:
    return (f"{checked} Q/DQ nodes checked against TensorRT's INT8 rules (int8, zero points 0, positive constant "
            f"scales, per-tensor activations, per-channel weights, opset <= {MAX_OPSET}): all pass; {kept}")


RULES = TargetRules(Target.TENSORRT, full_range=True, static_only=True, qdq_only=True,
                    half_qdq=(ir.DataType.FLOAT16, ir.DataType.BFLOAT16), max_opset=MAX_OPSET,
                    opset_reason="TensorRT 10's parser reads up to {max}", runtime="TensorRT", cpu_kernels=False,
                    violation=violation,
                    checked_nodes=count_qdq, describe=_describe)
