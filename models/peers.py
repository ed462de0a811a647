"""The quantizers a user compares sqonnx with, run the way their documentation shows."""

from __future__ import annotations

from pathlib import Path


def matmul_nbits(source: Path, out: Path, bits: int) -> Path:
    """onnxruntime's weight-only quantizer (MatMulNBits: int4 or int8 weights in blocks of 32 along the input,
    symmetric, accuracy_level 4 = int8 compute), as an onnxruntime-genai user runs it on the FP32 graph. Every
    MatMul with a constant weight is quantized, the LM head included; activations stay float."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(onnx.load(str(source)), bits=bits, block_size=32, is_symmetric=True,
                                     accuracy_level=4)
    quantizer.process()
    quantizer.model.save_model_to_file(str(out), use_external_data_format=True)
    return out
