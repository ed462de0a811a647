"""Replace each quantized linear layer by an explicit integer MatMul (QOperator form, and level O1).

    x -> [quantize x to uint8] -> MatMulInteger(x_q, W_q, x_zero_point) -> Cast(float)
      -> Mul(x_scale * W_scale) [-> Add(bias)]

How x is quantized is the level:
  O3  QuantizeLinear with the calibrated static scale (symmetric, stored as uint8 with zero point 128);
  O2  DynamicQuantizeLinear (asymmetric uint8, one scale per tensor, computed at run time);
  O1  one scale per token (row), from standard ops: ReduceMax(|x|, last axis) / 127, then
      Div -> Add 128 -> Round -> Cast(uint8). No standard QuantizeLinear takes a scale per row.

Activations are uint8 because onnxruntime's x86 kernels are built for u8 x s8 (an int8 x int8
MatMulInteger ran 10x slower here). The float rescale is written as Mul(Cast(MatMulInteger), Mul(x_scale,
W_scale)): that is the pattern onnxruntime's MatMulIntegerToFloatFusion turns into one MatMulIntegerToFloat
kernel (also for O1's per-row x_scale, and DynamicQuantizeMatMul at O2). At O3 both scales are constants,
so their product is stored as one and the integer MatMul runs unfused, followed by one Mul.

Siblings reading the same x (q/k/v, gate/up) share one quantized x.

`--target cuda` writes O3 with int8 activations (zero point 0): onnxruntime's CUDA MatMulInteger is int8 x int8
only (cublasGemmEx), and its QuantizeLinear, Cast and Mul have CUDA kernels, so every node stays on the GPU. A
float16 layer (where the target takes half Q/DQ) is quantized from its float16 input with a float16 scale; its int32
sums are cast to float32 for the rescale (they pass float16's 65504) and the result to float16:
x -> QuantizeLinear -> MatMulInteger -> Cast(float) -> Mul -> Cast(float16).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from sqonnx.config import Level
from sqonnx.graph.layers import LinearLayer, as_linear_layer
from sqonnx.graph.tensors import HALF_TYPES, add_initializer
from sqonnx.math.gptq import Rounded
from sqonnx.math.quant import ACTIVATION_QMAX, symmetric_scale
from sqonnx.passes.insert_qdq import LayerQuantization, round_up, weight_codes
from sqonnx.passes.quantizing import QuantizingPass

UINT8_ZERO = 128  # symmetric int8 codes [-127, 127] stored as uint8 [1, 255]


@dataclass
class _Shared:
    """What one run of the pass made once for several layers: a tied weight's codes, an activation read by several
    layers quantized once (per run: a pass keeps nothing between runs)."""

    weights: dict[ir.Value, tuple[ir.Value, np.ndarray]] = field(default_factory=dict)
    activations: dict[ir.Value, tuple[ir.Value, ir.Value, ir.Value]] = field(default_factory=dict)


class InsertIntegerMatMulPass(QuantizingPass):
    def __init__(self, plan: list[LayerQuantization], weight_qmax: int, per_channel: bool, level: Level,
                 opset: int = 18, signed: bool = False) -> None:
        super().__init__([item.layer for item in plan])
        self.opset = opset
        # int8 activations with zero point 0 (O3 only): onnxruntime's CUDA MatMulInteger takes int8 x int8 only
        self.signed = signed
        self.plan = plan
        self.weight_qmax = weight_qmax
        self.per_channel = per_channel
        self.level = level

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        shared = _Shared()
        for item in self.plan:
            layer = as_linear_layer(item.layer.node)
            if layer is None or item.layer.node.graph is None:
                continue  # already replaced
            self._replace(model.graph, layer, item.activation_max, item.level or self.level, item.rounded, shared)
            modified = True
        return ir.passes.PassResult(model, modified=modified)

    def _replace(self, graph: ir.Graph, layer: LinearLayer, activation_max: float, level: Level,
                 rounded: Rounded | None, shared: _Shared) -> None:
        name = layer.name
        x_q, x_scale, x_zero_point = self._quantized_activation(graph, layer, activation_max, level, shared)
        w_q, w_scale = self._quantized_weight(graph, layer, rounded, shared)
        nodes = [ir.node("MatMulInteger", [x_q, w_q, x_zero_point], name=f"{name}/MatMulInteger",
                         outputs=[ir.Value(name=f"{name}/output_int32")])]
        nodes.append(ir.node("Cast", [nodes[-1].outputs[0]], {"to": ir.DataType.FLOAT}, name=f"{name}/Cast",
                             outputs=[ir.Value(name=f"{name}/output_int32_as_float")]))
        cast = nodes[-1].outputs[0]
        half = layer.activation.dtype if layer.activation.dtype in HALF_TYPES else None
        output_name = f"{name}/output_unbiased" if layer.bias_value or half else name
        if x_scale.const_value is not None:  # O3: one constant scale per output channel
            scale = add_initializer(graph, f"{name}/output_scale",
                                    (x_scale.const_value.numpy().astype(np.float32) * w_scale).astype(np.float32))
            nodes.append(ir.node("Mul", [cast, scale], name=f"{name}/rescale_Mul",
                                 outputs=[ir.Value(name=output_name)]))
        elif level is Level.O1 and (layer.bias_value is not None or _feeds_constant_add(layer.node.outputs[0])):
            nodes += _rescale_without_fusion(graph, name, cast, x_scale, w_scale, output_name)
        else:
            w_scale_value = add_initializer(graph, f"{name}/weight_scale", w_scale)
            nodes.append(ir.node("Mul", [x_scale, w_scale_value], name=f"{name}/output_scale_Mul",
                                 outputs=[ir.Value(name=f"{name}/output_scale")]))
            nodes.append(ir.node("Mul", [cast, nodes[-1].outputs[0]], name=f"{name}/rescale_Mul",
                                 outputs=[ir.Value(name=output_name)]))
        if half is not None:
            nodes.append(ir.node("Cast", [nodes[-1].outputs[0]], {"to": half}, name=f"{name}/output_Cast",
                                 outputs=[ir.Value(name=f"{name}/output_{half.name.lower()}" if layer.bias_value
                                                   else name)]))
        if layer.bias_value is not None:
            nodes.append(ir.node("Add", [nodes[-1].outputs[0], layer.bias_value], name=f"{name}/bias_Add",
                                 outputs=[ir.Value(name=name)]))
        old_output = layer.node.outputs[0]
        new_output = nodes[-1].outputs[0]
        new_output.dtype, new_output.shape = half or ir.DataType.FLOAT, old_output.shape
        ir.convenience.replace_nodes_and_values(graph, layer.node, [layer.node], nodes, [old_output], [new_output])

    def _quantized_weight(self, graph: ir.Graph, layer: LinearLayer, rounded: Rounded | None,
                          shared: _Shared) -> tuple[ir.Value, np.ndarray]:
        """int8 weight in MatMulInteger's [in, out] layout, quantized once per initializer (tied weights)."""
        cached = shared.weights.get(layer.weight_value)
        if cached is None:
            codes, scale = weight_codes(layer, rounded, self.weight_qmax, self.per_channel)  # float32: the rescale's
            if layer.in_axis == 1:  # Gemm(transB=1) stores [out, in]
                codes = codes.T
            cached = (add_initializer(graph, f"{layer.weight_value.name}_quantized", codes), scale)
            shared.weights[layer.weight_value] = cached
        return cached

    def _quantized_activation(self, graph: ir.Graph, layer: LinearLayer, activation_max: float,
                              level: Level, shared: _Shared) -> tuple[ir.Value, ir.Value, ir.Value]:
        x = layer.activation
        cached = shared.activations.get(x)
        if cached is not None:
            return cached
        base = f"{layer.name}/input"
        nodes: list[ir.Node]
        if level is Level.O2:
            node = ir.node("DynamicQuantizeLinear", [x], name=f"{base}_DynamicQuantizeLinear",
                           outputs=[ir.Value(name=f"{base}_quantized"), ir.Value(name=f"{base}_scale"),
                                    ir.Value(name=f"{base}_zero_point")])
            nodes, cached = [node], (node.outputs[0], node.outputs[1], node.outputs[2])
        elif level is Level.O3:
            scale = symmetric_scale(activation_max, ACTIVATION_QMAX)
            if x.dtype in HALF_TYPES:  # the target's QuantizeLinear takes the half input and scale
                scale = round_up(scale, x.dtype)
            scale = add_initializer(graph, f"{base}_scale", scale)
            zero_point = add_initializer(graph, f"{base}_zero_point", np.array(0, dtype=np.int8)) if self.signed \
                else add_initializer(graph, f"{base}_zero_point", np.array(UINT8_ZERO, dtype=np.uint8))
            node = ir.node("QuantizeLinear", [x, scale, zero_point], name=f"{base}_QuantizeLinear",
                           outputs=[ir.Value(name=f"{base}_quantized")])
            nodes, cached = [node], (node.outputs[0], scale, zero_point)
        else:
            nodes, cached = self._per_token(graph, x, base)
        signed = self.signed and level is Level.O3
        cached[0].dtype, cached[0].shape = ir.DataType.INT8 if signed else ir.DataType.UINT8, x.shape
        graph.insert_before(layer.node, nodes)
        shared.activations[x] = cached
        return cached

    def _per_token(self, graph: ir.Graph, x: ir.Value, base: str) -> tuple[list[ir.Node], tuple[ir.Value, ...]]:
        def const(suffix: str, array: np.ndarray) -> ir.Value:
            return add_initializer(graph, f"{base}_{suffix}", array)

        def op(op_type: str, inputs: list[ir.Value], suffix: str, **attributes: object) -> ir.Node:
            return ir.node(op_type, inputs, attributes, name=f"{base}_{suffix}",  # type: ignore[arg-type]
                           outputs=[ir.Value(name=f"{base}_{suffix}")])

        nodes = [op("Abs", [x], "abs")]
        if self.opset >= 18:  # axes became an input in opset 18
            nodes.append(op("ReduceMax", [nodes[-1].outputs[0], const("last_axis", np.array([-1], np.int64))],
                            "token_max", keepdims=1))
        else:
            nodes.append(op("ReduceMax", [nodes[-1].outputs[0]], "token_max", axes=[-1], keepdims=1))
        nodes.append(op("Mul", [nodes[-1].outputs[0], const("inv_qmax", np.array(1 / ACTIVATION_QMAX, np.float32))],
                        "token_scale_raw"))
        # A row of zeros would divide by zero; any positive scale quantizes it to exactly 0.
        nodes.append(op("Max", [nodes[-1].outputs[0], const("min_scale", np.array(1e-12, np.float32))], "token_scale"))
        token_scale = nodes[-1].outputs[0]
        nodes.append(op("Div", [x, token_scale], "scaled"))
        offset = const("uint8_zero_float", np.array(UINT8_ZERO, np.float32))
        nodes.append(op("Add", [nodes[-1].outputs[0], offset], "offset"))
        # |x / scale| <= 127 by construction, so no Clip is needed before the cast.
        nodes.append(op("Round", [nodes[-1].outputs[0]], "rounded"))
        nodes.append(op("Cast", [nodes[-1].outputs[0]], "quantized", to=ir.DataType.UINT8))
        zero_point = const("zero_point", np.array(UINT8_ZERO, dtype=np.uint8))
        return nodes, (nodes[-1].outputs[0], token_scale, zero_point)


def _feeds_constant_add(value: ir.Value) -> bool:
    return any(node.op_type == "Add" and any(i is not None and i.const_value is not None for i in node.inputs)
               for node in value.consumers())


def _rescale_without_fusion(graph: ir.Graph, name: str, cast: ir.Value, token_scale: ir.Value, w_scale: np.ndarray,
                            output_name: str) -> list[ir.Node]:
    """y * W_scale * token_scale, in an order onnxruntime does not fuse.

    Its MatMulIntegerToFloatFusion also folds a following bias Add into MatMulIntegerToFloat, and that
    kernel multiplies by a per-row A scale *after* adding the bias, so the bias gets scaled by the token
    scale (onnxruntime 1.32: MiniLM O1 cosine 0.67 instead of 0.99). Layers with a bias therefore keep
    MatMulInteger + Cast + two Muls, slower but exact; layers without one (all of Llama's) are fused.
    """
    w_scale_value = add_initializer(graph, f"{name}/weight_scale", w_scale)
    by_weight = ir.node("Mul", [cast, w_scale_value], name=f"{name}/weight_rescale_Mul",
                        outputs=[ir.Value(name=f"{name}/output_weight_rescaled")])
    by_token = ir.node("Mul", [by_weight.outputs[0], token_scale], name=f"{name}/rescale_Mul",
                       outputs=[ir.Value(name=output_name)])
    return [by_weight, by_token]
