"""Which kernels onnxruntime's CPU provider really runs for a saved model.

A QDQ graph is only fast if onnxruntime's QDQ fusion turns each DQ -> MatMul into an integer kernel; an
unfused DequantizeLinear on a weight runs at every inference and the MatMul stays in float. We ask
onnxruntime for its optimized graph (`SessionOptions.optimized_model_filepath`) and count what is in it.
"""

from __future__ import annotations

import collections
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import onnxruntime as ort

INTEGER_KERNELS = ("QLinearMatMul", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QGemm", "MatMulInteger")


@dataclass
class KernelCheck:
    integer_kernels: dict[str, int] = field(default_factory=dict)
    float_linear: int = 0  # MatMul/Gemm nodes left in float (attention products, excluded layers)
    unfused: list[str] = field(default_factory=list)  # float MatMul/Gemm still fed by a DequantizeLinear
    dequantize_nodes: int = 0

    @property
    def integer_total(self) -> int:
        return sum(self.integer_kernels.values())

    def summary(self) -> str:
        kernels = ", ".join(f"{n} {op}" for op, n in sorted(self.integer_kernels.items())) or "none"
        text = f"integer kernels: {kernels}; float MatMul/Gemm: {self.float_linear}"
        if self.unfused:
            text += f"; NOT fused: {len(self.unfused)}"
        return text


def inspect_cpu_kernels(model_path: Path) -> KernelCheck:
    with tempfile.TemporaryDirectory(prefix="sqonnx-kernels-") as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.optimized_model_filepath = str(optimized)
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                         "optimized.onnx.data")
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                         "1024")
        ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        graph = onnx.load(str(optimized), load_external_data=False).graph
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
