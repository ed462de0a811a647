"""onnxruntime's CUDA provider: it has no fused W8A8 kernel and no DynamicQuantizeLinear, so activations are static
int8 (QuantizeLinear, zero point 0) into MatMulInteger (int8 x int8) -> Cast -> Mul, every node with a CUDA kernel by
onnxruntime's registrations (not measured on a GPU here); groups that need per-token activations stay float."""

from __future__ import annotations

from sqonnx.targets.rules import Target, TargetRules

CUDA_QDQ_OPSET = 21  # onnxruntime registers its CUDA QuantizeLinear / DequantizeLinear up to this opset


def _describe(_checked: int, quantized: int, kept: str) -> str:
    return (f"{quantized} layers as int8 QuantizeLinear -> MatMulInteger (int8 x int8) -> Cast -> Mul, every node "
            "with a kernel of onnxruntime's CUDA provider (by its registrations; not run on a GPU here); " + kept)


RULES = TargetRules(Target.CUDA, full_range=True, static_only=True, integer_ops=True, signed=True,
                    max_opset=CUDA_QDQ_OPSET,
                    opset_reason="onnxruntime's CUDA QuantizeLinear is registered up to {max} (later ones run on the "
                                 "CPU)",
                    runtime="onnxruntime's CUDA provider", describe=_describe)
