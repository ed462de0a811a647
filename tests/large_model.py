"""Synthetic transformer-like stacks in external data, written weight by weight (never the whole model in memory):
LayerNorm -> MatMul -> residual Add per layer, with planted outlier channels in the norm. At 9 layers of 8192 it is
above protobuf's 2 GB limit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir

HIDDEN = 8192
LAYERS = 9  # 9 x 8192 x 8192 x 4 bytes = 2.4 GB


def build_large_model(path: Path, seed: int = 0) -> Path:
    return build_stack(path, LAYERS, HIDDEN, seed)


def build_stack(path: Path, layers: int, hidden: int, seed: int = 0) -> Path:
    """`layers` x (LayerNorm, hidden x hidden MatMul, residual Add) on input x [1, seq, hidden], output y; the
    weights in `<path>.data`, each written as soon as it is drawn."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    data_name = f"{path.name}.data"
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1, "seq", hidden]))
    nodes: list[ir.Node] = []
    initializers: list[ir.Value] = []
    with open(path.parent / data_name, "wb") as data:

        def const(name: str, array: np.ndarray) -> ir.Value:
            offset = data.tell()
            data.write(array.tobytes())
            tensor = ir.ExternalTensor(data_name, offset, array.nbytes, ir.DataType.FLOAT, shape=ir.Shape(array.shape),
                                       name=name, base_dir=str(path.parent))
            value = ir.Value(name=name, type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(array.shape),
                             const_value=tensor)
            initializers.append(value)
            return value

        current = x
        for i in range(layers):
            gamma = np.ones(hidden, np.float32)
            gamma[:4] = 20.0  # planted outlier channels
            norm = ir.Node("", "LayerNormalization", [current, const(f"ln{i}.gamma", gamma),
                                                      const(f"ln{i}.beta", np.zeros(hidden, np.float32))],
                           name=f"/layer{i}/ln")
            weight = rng.standard_normal((hidden, hidden), dtype=np.float32) * np.float32(0.01)
            matmul = ir.Node("", "MatMul", [norm.outputs[0], const(f"layer{i}.weight", weight)],
                             name=f"/layer{i}/proj/MatMul")
            del weight
            residual = ir.Node("", "Add", [current, matmul.outputs[0]], name=f"/layer{i}/residual")
            for node in (norm, matmul, residual):
                node.outputs[0].name = f"{node.name}_output_0"
            nodes += [norm, matmul, residual]
            current = residual.outputs[0]
    current.name = "y"
    current.type = ir.TensorType(ir.DataType.FLOAT)
    current.shape = ir.Shape([1, "seq", hidden])
    graph = ir.Graph([x], [current], nodes=nodes, initializers=initializers, opset_imports={"": 18}, name="stack")
    ir.save(ir.Model(graph, ir_version=8), path)
    return path
