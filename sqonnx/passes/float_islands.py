"""Put each quantized linear layer of a float16 / bfloat16 model in a float32 island: Cast in, Cast out.

Everything that stays float keeps the model's own type (norms, attention, residual stream, the LM head's
output), but the quantized layers run on integer kernels only in float32: onnxruntime's CPU QDQ fusion and its
MatMulIntegerToFloat kernel take float32 activations and scales. Measured on one 2048 x 5632 layer, 256 tokens
(onnxruntime 1.32, this machine): float16 Q/DQ around the MatMul is not fused and runs as DequantizeLinear ->
float MatMul, 55 ms; the float32 island runs as QuantizeLinear -> MatMulIntegerToFloat with its two Casts,
2.6 ms; the same layer in a float32 model, 1.9 ms. So each half-precision layer becomes

    x (half) -> Cast(float) -> [layer, quantized as in a float32 model] -> Cast(half) -> y

with siblings that read one x sharing its Cast. The weight stays as it is until the quantizer replaces it with
int8 codes and float32 scales (computed from the half weights in float32, no float32 copy of them); a Gemm's
bias (inside the node) becomes float32. Float32 layers are left alone.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from sqonnx.graph.layers import LinearLayer
from sqonnx.graph.tensors import HALF_TYPES, set_constant_input


class FloatIslandsPass(ir.passes.InPlacePass):
    def __init__(self, layers: list[LinearLayer]) -> None:
        super().__init__()
        self.layers = layers

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        casts: dict[int, ir.Value] = {}
        modified = False
        for layer in self.layers:
            node = layer.node
            x = layer.activation
            half = x.dtype if x.dtype in HALF_TYPES else None
            weight_type = layer.weight_value.const_value.dtype if layer.weight_value.const_value else None
            if half is None and weight_type in HALF_TYPES:
                half = weight_type
            if half is None:
                continue
            modified = True
            if x.dtype in HALF_TYPES:
                if id(x) not in casts:
                    cast = ir.node("Cast", [x], {"to": ir.DataType.FLOAT}, name=f"{layer.name}/input_Cast",
                                   outputs=[ir.Value(name=f"{layer.name}/input_float32")])
                    cast.outputs[0].dtype, cast.outputs[0].shape = ir.DataType.FLOAT, x.shape
                    graph.insert_before(node, cast)
                    casts[id(x)] = cast.outputs[0]
                node.replace_input_with(0, casts[id(x)])
            if layer.bias_value is not None and layer.bias_value.const_value is not None:
                bias = layer.bias_value.const_value.numpy().astype(np.float32)
                set_constant_input(graph, node, 2, bias, "_float32", keep_dtype=False)
            output = node.outputs[0]
            name = output.name
            output.name = f"{layer.name}/output_float32"
            back = ir.Value(name=name, type=ir.TensorType(half), shape=output.shape)
            output.replace_all_uses_with(back, replace_graph_outputs=True)
            output.type = ir.TensorType(ir.DataType.FLOAT)  # its type object may be shared with a clone
            graph.insert_after(node, ir.node("Cast", [output], {"to": half}, name=f"{layer.name}/output_Cast",
                                             outputs=[back]))
        return ir.passes.PassResult(model, modified=modified)
