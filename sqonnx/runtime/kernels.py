"""Which kernels onnxruntime's CPU provider really runs for a quantized model, block by block.

A QDQ graph is only fast if onnxruntime's QDQ fusion turns each DQ -> MatMul into an integer kernel; an
unfused DequantizeLinear on a weight runs at every inference and the MatMul stays in float. We ask
onnxruntime for its optimized graph (`SessionOptions.optimized_model_filepath`) and count what is in it. Each
quantized block is checked in a session of its own (the session the block's evaluation samples run in), so
no session ever holds the whole model; the fusions are local to a layer, so the sum over blocks is the count
for the model.
"""

from __future__ import annotations

import collections
import functools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

INTEGER_KERNELS = ("QLinearMatMul", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QGemm", "MatMulInteger",
                   "MatMulNBits")


@dataclass
class KernelCheck:
    integer_kernels: dict[str, int] = field(default_factory=dict)
    float_linear: int = 0  # MatMul/Gemm nodes left in float (attention products, excluded layers)
    unfused: list[str] = field(default_factory=list)  # float MatMul/Gemm still fed by a DequantizeLinear
    dequantize_nodes: int = 0
    blocks: int = 0  # quantized blocks of the model
    checked_blocks: int = 0  # of them, those onnxruntime optimized (the rest repeat a checked block's pattern)
    # MatMulNBits block sizes at accuracy_level 4 for which MLAS has no int8 kernel on this CPU: they compute in float
    nbits_in_float: set[int] = field(default_factory=set)

    @property
    def integer_total(self) -> int:
        return sum(self.integer_kernels.values())

    def add(self, other: KernelCheck) -> None:
        for op, count in other.integer_kernels.items():
            self.integer_kernels[op] = self.integer_kernels.get(op, 0) + count
        self.float_linear += other.float_linear
        self.unfused += other.unfused
        self.dequantize_nodes += other.dequantize_nodes
        self.nbits_in_float |= other.nbits_in_float

    def summary(self) -> str:
        kernels = ", ".join(f"{n} {op}" for op, n in sorted(self.integer_kernels.items())) or "none"
        text = f"integer kernels: {kernels}; float MatMul/Gemm: {self.float_linear}"
        if self.unfused:
            text += f"; NOT fused: {len(self.unfused)}"
        if self.integer_kernels.get("MatMulNBits"):
            text += ("; MatMulNBits computes in FLOAT for blocks of " + ", ".join(map(str, sorted(self.nbits_in_float)))
                     + " (no int8 kernel on this CPU)" if self.nbits_in_float
                     else "; MatMulNBits computes in int8 (accuracy_level 4, checked)")
        if self.checked_blocks < self.blocks:
            text += f" ({self.checked_blocks} of {self.blocks} blocks optimized; the others repeat their ops)"
        return text


def count_kernels(optimized: Path) -> KernelCheck:
    """What onnxruntime's optimized graph at `optimized` runs; the file and its data are removed."""
    try:
        graph = onnx.load(str(optimized), load_external_data=False).graph
    finally:
        optimized.unlink(missing_ok=True)
        optimized.with_name(f"{optimized.name}.data").unlink(missing_ok=True)
    producers = {out: node for node in graph.node for out in node.output}
    counts = collections.Counter(node.op_type for node in graph.node)
    check = KernelCheck(
        integer_kernels={op: counts[op] for op in INTEGER_KERNELS if counts[op]},
        float_linear=counts["MatMul"] + counts["Gemm"] + counts["FusedMatMul"] + counts["FusedGemm"],
        dequantize_nodes=counts["DequantizeLinear"],
    )
    for node in graph.node:
        if node.op_type == "MatMulNBits":
            attributes = {a.name: a.i for a in node.attribute}
            if attributes.get("accuracy_level") == 4 and not nbits_computes_int8(attributes["bits"],
                                                                                  attributes["block_size"]):
                check.nbits_in_float.add(attributes["block_size"])
        if node.op_type in ("MatMul", "Gemm", "FusedMatMul", "FusedGemm"):
            feeders = [producers.get(name) for name in node.input[:2]]
            if any(f is not None and f.op_type == "DequantizeLinear" for f in feeders):
                check.unfused.append(node.name)
    return check


@functools.cache
def nbits_computes_int8(bits: int, block: int) -> bool:
    """Whether onnxruntime's CPU MatMulNBits really quantizes its input to int8 at accuracy_level 4 for this
    (bits, block) pair on this CPU. Where MLAS has no int8 kernel for the pair it silently computes in float; its
    output is then the very output of accuracy_level 0, while int8 activations change the last digits."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    k, n = 2 * block, 16
    rng = np.random.default_rng(0)
    b = rng.integers(0, 256, (n, k // block, block * bits // 8), dtype=np.uint8)
    scales = rng.uniform(0.01, 0.1, (n, k // block)).astype(np.float32)
    x = rng.standard_normal((3, k)).astype(np.float32)
    outputs = []
    for level in (0, 4):
        node = helper.make_node("MatMulNBits", ["x", "b", "s"], ["y"], domain="com.microsoft", K=k, N=n, bits=bits,
                                block_size=block, accuracy_level=level)
        graph = helper.make_graph([node], "probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, k])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, n])],
                                  [numpy_helper.from_array(b, "b"), numpy_helper.from_array(scales, "s")])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                        helper.make_opsetid("com.microsoft", 1)])
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        outputs.append(session.run(None, {"x": x})[0])
    return not np.array_equal(outputs[0], outputs[1])
