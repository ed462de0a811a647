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
from dataclasses import dataclass, field
from pathlib import Path

import onnx

INTEGER_KERNELS = ("QLinearMatMul", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QGemm", "MatMulInteger")


@dataclass
class KernelCheck:
    integer_kernels: dict[str, int] = field(default_factory=dict)
    float_linear: int = 0  # MatMul/Gemm nodes left in float (attention products, excluded layers)
    unfused: list[str] = field(default_factory=list)  # float MatMul/Gemm still fed by a DequantizeLinear
    dequantize_nodes: int = 0
    blocks: int = 0  # quantized blocks of the model
    checked_blocks: int = 0  # of them, those onnxruntime optimized (the rest repeat a checked block's pattern)

    @property
    def integer_total(self) -> int:
        return sum(self.integer_kernels.values())

    def add(self, other: KernelCheck) -> None:
        for op, count in other.integer_kernels.items():
            self.integer_kernels[op] = self.integer_kernels.get(op, 0) + count
        self.float_linear += other.float_linear
        self.unfused += other.unfused
        self.dequantize_nodes += other.dequantize_nodes

    def summary(self) -> str:
        kernels = ", ".join(f"{n} {op}" for op, n in sorted(self.integer_kernels.items())) or "none"
        text = f"integer kernels: {kernels}; float MatMul/Gemm: {self.float_linear}"
        if self.unfused:
            text += f"; NOT fused: {len(self.unfused)}"
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
        if node.op_type in ("MatMul", "Gemm", "FusedMatMul", "FusedGemm"):
            feeders = [producers.get(name) for name in node.input[:2]]
            if any(f is not None and f.op_type == "DequantizeLinear" for f in feeders):
                check.unfused.append(node.name)
    return check
