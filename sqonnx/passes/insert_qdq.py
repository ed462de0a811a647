"""Insert standard-domain QuantizeLinear/DequantizeLinear around each quantized linear layer (QDQ form).

Weights become int8 initializers behind one DequantizeLinear. Activations get, at O3, a Q -> DQ pair with
a static symmetric scale; at O2, DynamicQuantizeLinear -> DQ (onnxruntime fuses that, with the weight's
DQ and the MatMul, into DynamicQuantizeMatMul). O1 (per-token) has no Q/DQ spelling: a standard
QuantizeLinear takes one scale per tensor or per axis, not per row; see insert_integer_matmul.

The O3 shape is what onnxruntime's CPU QDQ fusion needs to turn the layer into an
integer kernel (QLinearMatMul when a Q follows, MatMulIntegerToFloat when not): on x86 an int8 Q -> DQ
pair is only fused after being rewritten to uint8, which requires explicit constant int8 zero points on
both nodes, equal zero points, and a Q with exactly one reader. So every layer gets its own pair even
when siblings read the same X (q/k/v): three cheap Q ops instead of three unfused DQs per inference.

A layer is quantized in its activation's type: float32, or float16 / bfloat16 where the target's runtime takes
half Q/DQ (TensorRT: `targets.rules.TargetRules.half_qdq`; CPU targets put half layers in float32 islands first).
Scales are then stored in that type and every DequantizeLinear gives it, so nothing between a Q/DQ pair and its
layer is float32. The weight's codes are rounded against the scale as stored (`weight_codes`'s `dtype`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from sqonnx.config import Level
from sqonnx.graph.layers import LinearLayer, as_linear_layer
from sqonnx.graph.tensors import HALF_TYPES, add_initializer, opset_version
from sqonnx.math.gptq import Rounded
from sqonnx.math.quant import ACTIVATION_QMAX, quantize_symmetric, quantize_weight, symmetric_scale
from sqonnx.passes.quantizing import QuantizingPass


@dataclass(frozen=True)
class LayerQuantization:
    """How one layer is quantized: its level (None: the pass's own) and, for O3, the activation's static
    max |x| after smoothing."""

    layer: LinearLayer
    activation_max: float
    level: Level | None = None
    rounded: Rounded | None = None  # the weight's int8 codes and scales, rounded by GPTQ; None: round to nearest


def weight_codes(layer: LinearLayer, rounded: Rounded | None, qmax: int, per_channel: bool,
                 dtype: ir.DataType = ir.DataType.FLOAT) -> tuple[np.ndarray, np.ndarray]:
    """int8 codes in `layer`'s weight layout, and their scale (per output channel, or one) in `dtype`. A half type's
    scale is rounded up to it and the codes rounded against that (rounded up, no code leaves the range); GPTQ's codes
    are fixed, so their scale is rounded to the nearest half value instead."""
    if rounded is None:
        codes, scale = quantize_weight(layer.weight, layer.in_axis, qmax, per_channel)
    else:
        codes = rounded.codes.astype(np.int8)  # [in, out]
        codes, scale = (codes if layer.in_axis == 0 else codes.T), rounded.scales[:, 0].copy()
    if dtype == ir.DataType.FLOAT:
        return codes, scale
    if rounded is not None:
        return codes, np.asarray(scale, np.float32).astype(dtype.numpy())
    stored = round_up(scale, dtype)
    as_float = stored.astype(np.float32)
    codes = quantize_symmetric(layer.weight, np.expand_dims(as_float, layer.in_axis) if per_channel else as_float, qmax)
    return codes, stored


def round_up(scale: np.ndarray, dtype: ir.DataType) -> np.ndarray:
    """Positive `scale` in the half type `dtype`, each value the nearest at or above it: |x| / scale then stays within
    the range the float32 scale gave. (float16 and bfloat16 are 16-bit: the next value up is the next bit pattern.)"""
    half = np.asarray(scale, np.float32).astype(dtype.numpy())
    below = half.astype(np.float32) < scale
    bits = half.view(np.uint16)
    return np.where(below, bits + np.uint16(1), bits).astype(np.uint16).view(dtype.numpy())


class InsertQDQPass(QuantizingPass):
    def __init__(self, plan: list[LayerQuantization], weight_qmax: int, per_channel: bool,
                 level: Level = Level.O3) -> None:
        super().__init__([item.layer for item in plan])
        if level is Level.O1:
            raise ValueError("O1 (per-token) has no QDQ form; use InsertIntegerMatMulPass")
        self.plan = plan
        self.level = level
        self.weight_qmax = weight_qmax
        self.per_channel = per_channel

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        # Tied weights (one initializer read by several layers) are quantized once and shared.
        shared: dict[ir.Value, list[ir.Value]] = {}
        opset = opset_version(model.graph)
        for item in self.plan:
            # A layer already quantized has a DequantizeLinear, not a constant, as its weight.
            if as_linear_layer(item.layer.node) is None:
                continue
            layer = item.layer
            if layer.node.op_type == "Gemm":
                layer = gemm_as_batched_matmul(model.graph, layer, opset)
            self._quantize_weight(model.graph, layer, item.rounded, shared)
            level = item.level or self.level
            if level is Level.O1:
                raise ValueError(f"{layer.name}: O1 (per-token) has no QDQ form; use InsertIntegerMatMulPass")
            if level is Level.O3:
                self._quantize_activation(model.graph, layer, item.activation_max)
            else:
                self._quantize_activation_dynamically(model.graph, layer)
            modified = True
        return ir.passes.PassResult(model, modified=modified)

    def _quantize_weight(self, graph: ir.Graph, layer: LinearLayer, rounded: Rounded | None,
                         shared: dict[ir.Value, list[ir.Value]]) -> None:
        weight = layer.weight
        out_axis = 1 - layer.in_axis
        inputs = shared.get(layer.weight_value)
        if inputs is None:
            inputs = self._weight_initializers(graph, layer, rounded)
            shared[layer.weight_value] = inputs
        attributes = {"axis": ir.AttrInt64("axis", out_axis)} if self.per_channel else {}
        dequantize = ir.Node("", "DequantizeLinear", inputs, attributes, name=f"{layer.name}/weight_DequantizeLinear")
        _name_output(dequantize, f"{layer.name}/weight_dequantized", weight.shape, _type(layer.activation))
        graph.insert_before(layer.node, dequantize)
        layer.node.replace_input_with(1, dequantize.outputs[0])

    def _weight_initializers(self, graph: ir.Graph, layer: LinearLayer, rounded: Rounded | None) -> list[ir.Value]:
        base = str(layer.weight_value.name)
        codes, scale = weight_codes(layer, rounded, self.weight_qmax, self.per_channel, _type(layer.activation))
        zero_point = np.zeros(scale.shape, dtype=np.int8)
        return [add_initializer(graph, f"{base}_quantized", codes),
                add_initializer(graph, f"{base}_scale", scale),
                add_initializer(graph, f"{base}_zero_point", zero_point)]

    def _quantize_activation(self, graph: ir.Graph, layer: LinearLayer, activation_max: float) -> None:
        activation = layer.activation
        name = layer.name
        dtype = _type(activation)
        computed = symmetric_scale(activation_max, ACTIVATION_QMAX)
        scale = add_initializer(graph, f"{name}/input_scale", computed if dtype == ir.DataType.FLOAT else
                                round_up(np.asarray(computed), dtype))
        zero_point = add_initializer(graph, f"{name}/input_zero_point", np.zeros((), dtype=np.int8))
        quantize = ir.Node("", "QuantizeLinear", [activation, scale, zero_point], name=f"{name}/input_QuantizeLinear")
        _name_output(quantize, f"{name}/input_quantized", activation.shape, ir.DataType.INT8)
        dequantize = ir.Node("", "DequantizeLinear", [quantize.outputs[0], scale, zero_point],
                             name=f"{name}/input_DequantizeLinear")
        _name_output(dequantize, f"{name}/input_dequantized", activation.shape, dtype)
        graph.insert_before(layer.node, [quantize, dequantize])
        layer.node.replace_input_with(0, dequantize.outputs[0])

    def _quantize_activation_dynamically(self, graph: ir.Graph, layer: LinearLayer) -> None:
        # One DynamicQuantizeLinear per layer: onnxruntime only fuses it into DynamicQuantizeMatMul
        # when it has a single reader.
        activation = layer.activation
        name = layer.name
        quantize = ir.Node("", "DynamicQuantizeLinear", [activation], num_outputs=3,
                           name=f"{name}/input_DynamicQuantizeLinear")
        _name_output(quantize, f"{name}/input_quantized", activation.shape, ir.DataType.UINT8)
        quantize.outputs[1].name = f"{name}/input_scale"
        quantize.outputs[2].name = f"{name}/input_zero_point"
        dequantize = ir.Node("", "DequantizeLinear", list(quantize.outputs), name=f"{name}/input_DequantizeLinear")
        _name_output(dequantize, f"{name}/input_dequantized", activation.shape)
        graph.insert_before(layer.node, [quantize, dequantize])
        layer.node.replace_input_with(0, dequantize.outputs[0])


def gemm_as_batched_matmul(graph: ir.Graph, layer: LinearLayer, opset: int) -> LinearLayer:
    """Rewrite Gemm(x, W[, b]) on 2-D x as Squeeze(MatMul(Unsqueeze(x), W) [+ b]), named like the Gemm.

    onnxruntime's CPU optimizer turns MatMul + Add on 2-D inputs back into Gemm before its QDQ fusion runs,
    and DequantizeLinear -> Gemm is never fused: GPT-2's Conv1D and OPT's fc layers ran as a float Gemm
    behind a weight DequantizeLinear. On a 3-D input MatMul + Add stays, and MatMul becomes
    MatMulIntegerToFloat; Unsqueeze/Squeeze of axis 0 only relabel the buffer.
    """
    node, name = layer.node, layer.name
    x = layer.activation
    weight = layer.weight_value
    if layer.in_axis == 1:  # transB: MatMul wants [in, out]
        weight = add_initializer(graph, f"{weight.name}_transposed", layer.weight.T)
    axes = [add_initializer(graph, f"{name}/axis0", np.array([0], np.int64))] if opset >= 13 else []
    attrs = {} if opset >= 13 else {"axes": ir.AttrInt64s("axes", [0])}
    dtype = _type(x)  # float32, or the half type a GPU target quantizes in
    unsqueeze = ir.Node("", "Unsqueeze", [x, *axes], attrs, name=f"{name}/Unsqueeze")
    _name_output(unsqueeze, f"{name}/input_batched", None, dtype)
    matmul = ir.Node("", "MatMul", [unsqueeze.outputs[0], weight], name=name)
    _name_output(matmul, f"{name}/output_batched", None, dtype)
    nodes = [unsqueeze, matmul]
    if layer.bias_value is not None:
        nodes.append(ir.Node("", "Add", [matmul.outputs[0], layer.bias_value], name=f"{name}/bias_Add"))
        _name_output(nodes[-1], f"{name}/output_biased", None, dtype)
    nodes.append(ir.Node("", "Squeeze", [nodes[-1].outputs[0], *axes], dict(attrs), name=f"{name}/Squeeze"))
    old_output = node.outputs[0]
    new_output = nodes[-1].outputs[0]
    new_output.name = f"{name}/output"
    new_output.dtype, new_output.shape = dtype, old_output.shape
    ir.convenience.replace_nodes_and_values(graph, node, [node], nodes, [old_output], [new_output])
    converted = as_linear_layer(matmul)
    assert converted is not None
    return converted


def _type(activation: ir.Value) -> ir.DataType:
    """The float type a layer reading `activation` is quantized in: its own half type, else float32."""
    return activation.dtype if activation.dtype in HALF_TYPES else ir.DataType.FLOAT


def _name_output(node: ir.Node, name: str, shape: object, dtype: ir.DataType = ir.DataType.FLOAT) -> None:
    output = node.outputs[0]
    output.name = name
    output.dtype = dtype
    if shape is not None:
        output.shape = ir.Shape(shape) if not isinstance(shape, ir.Shape) else shape
