"""onnxruntime's CUDA provider: it has no fused W8A8 kernel and no DynamicQuantizeLinear, so activations are static
int8 (QuantizeLinear, zero point 0) into MatMulInteger (int8 x int8) -> Cast -> Mul, every node with a CUDA kernel by
onnxruntime's registrations (not measured on a GPU here).

Half-precision models: the CUDA QuantizeLinear takes float16 input and scale from opset 19 (`quantize_linear.cc`
registers int8 with MLFloat16 for 19-20 and 21+), bfloat16 never. So an FP16 layer is quantized straight from its
float16 input; a BF16 layer's input is cast to float32 first (the float island the CPU form has). Either way the
int32 sums are cast to float32 before the rescale and to the model's type after it: a sum of 576 int8 products
reaches 9.3 million, past float16's 65504, and bfloat16 keeps 8 bits of it."""

from __future__ import annotations

import onnx_ir as ir

from sqonnx.targets.rules import Target, TargetRules

CUDA_QDQ_OPSET = 21  # onnxruntime registers its CUDA QuantizeLinear / DequantizeLinear up to this opset


def _describe(_checked: int, quantized: int, kept: str) -> str:
    return (f"{quantized} layers as int8 QuantizeLinear -> MatMulInteger (int8 x int8) -> Cast -> Mul, every node "
            "with a kernel of onnxruntime's CUDA provider (by its registrations; not run on a GPU here); " + kept)


RULES = TargetRules(Target.CUDA, full_range=True, static_only=True, integer_ops=True, signed=True,
                    half_qdq=(ir.DataType.FLOAT16,), max_opset=CUDA_QDQ_OPSET,
                    opset_reason="onnxruntime's CUDA QuantizeLinear is registered up to {max} (later ones run on the "
                                 "CPU)",
                    runtime="onnxruntime's CUDA provider", cpu_kernels=False, describe=_describe)
