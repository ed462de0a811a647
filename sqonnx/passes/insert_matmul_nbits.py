"""Write linear layers as onnxruntime's MatMulNBits (com.microsoft): 4- or 8-bit block-quantized weights, W4A8 / W8A8.

MatMulNBits(A, B, scales[, zero_points][, g_idx][, bias]) computes A @ dequantize(B), with B the weight
[K, N] stored transposed and packed (onnxruntime's contrib_defs and MLAS): B is uint8 [N, ceil(K / block),
block * bits / 8], two 4-bit codes per byte, the lower channel in the low nibble (8 bits: one code a byte); scales
are [N, ceil(K / block)] in A's float type; without zero_points a block's zero point is 2^(bits - 1), so a 4-bit
code c in [-8, 7] is stored as c + 8, an 8-bit one in [-128, 127] as c + 128. A K that is not a multiple of the
block is padded with code 0. With accuracy_level 4 the CPU kernel quantizes A to int8 per row and block (of the
weight's block size) and multiplies int8 x int4 (or int8) on VNNI / NEON; level 0 computes in float. Never a
g_idx and never float zero points: either takes onnxruntime's slow path
(no weight pre-packing). A Gemm's bias becomes MatMulNBits' bias input; transB is undone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from sqonnx.graph.layers import LinearLayer, as_linear_layer
from sqonnx.graph.tensors import add_initializer, constant
from sqonnx.math.gptq import Rounded
from sqonnx.passes.quantizing import QuantizingPass

MS_DOMAIN = "com.microsoft"
# accuracy_level 4: int8 activations per block inside the kernel (W4A8); 0 computes in float (W4A16).
ACCURACY_LEVEL = 4


@dataclass(frozen=True)
class NBitsLayer:
    """A layer to write as MatMulNBits, with its weight already rounded (GPTQ or nearest) on the `bits` grid."""

    layer: LinearLayer
    rounded: Rounded
    bits: int = 4


def pack(rounded: Rounded, bits: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """MatMulNBits' B (uint8 [N, blocks, block * bits / 8]) and scales ([N, blocks], float32) of a weight on the
    `bits` grid."""
    codes = rounded.codes  # [K, N], in [-2^(bits-1), 2^(bits-1) - 1]
    k, n = codes.shape
    block, zero = rounded.group, 1 << (bits - 1)
    blocks = -(-k // block)
    stored = np.full((n, blocks * block), zero, np.uint8)
    stored[:, :k] = (codes.T.astype(np.int16) + zero).astype(np.uint8)
    packed = stored if bits == 8 else stored[:, 0::2] | (stored[:, 1::2] << 4)
    return packed.reshape(n, blocks, block * bits // 8), np.ascontiguousarray(rounded.scales, np.float32)


def unpack(b: np.ndarray, scales: np.ndarray, k: int, bits: int = 4) -> np.ndarray:
    """The float weight [K, N] MatMulNBits computes with (a numpy reference: tests, the kernel check)."""
    n, blocks, width = b.shape
    flat = b.reshape(n, blocks * width).astype(np.int32)
    if bits == 4:
        stored = np.empty((n, blocks * width * 2), np.int32)
        stored[:, 0::2] = flat & 0x0F
        stored[:, 1::2] = flat >> 4
    else:
        stored = flat
    per_channel = np.repeat(scales, stored.shape[1] // blocks, axis=1)
    return ((stored - (1 << (bits - 1))) * per_channel)[:, :k].T.astype(np.float32)


class InsertMatMulNBitsPass(QuantizingPass):
    def __init__(self, layers: list[NBitsLayer], accuracy_level: int = ACCURACY_LEVEL) -> None:
        super().__init__([item.layer for item in layers])
        self.items = layers
        self.accuracy_level = accuracy_level

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for item in self.items:
            layer = item.layer
            if as_linear_layer(layer.node) is None:
                continue
            _replace(graph, layer, item.rounded, item.bits, self.accuracy_level)
            modified = True
        if modified and MS_DOMAIN not in model.opset_imports:
            model.opset_imports[MS_DOMAIN] = 1
        return ir.passes.PassResult(model, modified=modified)


def _replace(graph: ir.Graph, layer: LinearLayer, rounded: Rounded, bits: int, accuracy_level: int) -> None:
    node, name = layer.node, layer.name
    k, n = rounded.codes.shape
    b, scales = pack(rounded, bits)
    base = str(layer.weight_value.name)
    inputs: list[ir.Value | None] = [layer.activation, add_initializer(graph, f"{base}_int{bits}", b),
                                     add_initializer(graph, f"{base}_int{bits}_scale", scales)]
    bias = constant(layer.bias_value)
    if bias is not None:  # Gemm's C, broadcast over rows: MatMulNBits takes [N]
        inputs += [None, None, add_initializer(graph, f"{name}/bias", np.broadcast_to(
            bias.astype(np.float32), (1, n)).reshape(n).copy())]
    replacement = ir.Node(MS_DOMAIN, "MatMulNBits", inputs, {
        "K": ir.AttrInt64("K", k), "N": ir.AttrInt64("N", n), "bits": ir.AttrInt64("bits", bits),
        "block_size": ir.AttrInt64("block_size", rounded.group),
        "accuracy_level": ir.AttrInt64("accuracy_level", accuracy_level)}, name=name)
    old = node.outputs[0]
    output_name = old.name
    old.name = f"{output_name}/replaced"
    new = replacement.outputs[0]
    new.name, new.type, new.shape = output_name, old.type, old.shape
    graph.insert_before(node, replacement)
    old.replace_all_uses_with(new, replace_graph_outputs=True)
    graph.remove(node, safe=True)
