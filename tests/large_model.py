"""A synthetic transformer-like stack above protobuf's 2 GB limit, weights in external data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir

HIDDEN = 8192
LAYERS = 9  # 9 x 8192 x 8192 x 4 bytes = 2.4 GB


def build_large_model(path: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1, "seq", HIDDEN]))
    nodes: list[ir.Node] = []
    initializers: list[ir.Value] = []

    def const(name: str, array: np.ndarray) -> ir.Value:
        value = ir.Value(name=name, type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(array.shape),
                         const_value=ir.tensor(array, name=name))
        initializers.append(value)
        return value

    current = x
    for i in range(LAYERS):
        gamma = np.ones(HIDDEN, np.float32)
        gamma[:4] = 20.0  # planted outlier channels
        norm = ir.Node("", "LayerNormalization", [current, const(f"ln{i}.gamma", gamma),
                                                  const(f"ln{i}.beta", np.zeros(HIDDEN, np.float32))],
                       name=f"/layer{i}/ln")
        weight = (rng.standard_normal((HIDDEN, HIDDEN), dtype=np.float32) * 0.01)
        matmul = ir.Node("", "MatMul", [norm.outputs[0], const(f"layer{i}.weight", weight)],
                         name=f"/layer{i}/proj/MatMul")
        residual = ir.Node("", "Add", [current, matmul.outputs[0]], name=f"/layer{i}/residual")
        for node in (norm, matmul, residual):
            node.outputs[0].name = f"{node.name}_output_0"
        nodes += [norm, matmul, residual]
        current = residual.outputs[0]
    current.name = "y"
    current.type = ir.TensorType(ir.DataType.FLOAT)
    current.shape = ir.Shape([1, "seq", HIDDEN])
    graph = ir.Graph([x], [current], nodes=nodes, initializers=initializers, opset_imports={"": 18}, name="large")
    ir.save(ir.Model(graph, ir_version=8), path, external_data=f"{path.name}.data")
    return path
