"""Folding into onnxruntime's fused norms and into Gemm(transB=1): exact, and onnxruntime runs it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from sqonnx.config import Unabsorbed
from sqonnx.graph.layers import find_linear_layers
from sqonnx.passes.smooth import SmoothPass, SmoothPassResult, SmoothSettings
from sqonnx.passes.smoothing_groups import find_smoothing_groups
from tests.calibrate import statistics

C, N = 16, 24
MS = "com.microsoft"


def _norm(kind: str, rng: np.random.Generator) -> tuple[list[onnx.NodeProto], dict[str, np.ndarray], list[str]]:
    gamma = (1 + rng.standard_normal(C)).astype(np.float32)
    gamma[2] = 40.0  # outlier channel made by the norm
    beta = rng.standard_normal(C).astype(np.float32)
    inits = {"gamma": gamma, "beta": beta}
    if kind == "LayerNormalization":
        nodes = [helper.make_node(kind, ["x", "gamma", "beta"], ["h"], name="norm", axis=-1)]
    elif kind == "SimplifiedLayerNormalization":
        nodes = [helper.make_node(kind, ["x", "gamma"], ["h"], name="norm", axis=-1, epsilon=1e-5)]
    elif kind == "SkipLayerNormalization":
        nodes = [helper.make_node(kind, ["x", "skip", "gamma", "beta"], ["h", "", "", "sum"], name="norm",
                                  domain=MS, epsilon=1e-5)]
    else:
        nodes = [helper.make_node(kind, ["x", "skip", "gamma"], ["h", "", "", "sum"], name="norm",
                                  domain=MS, epsilon=1e-5)]
    extra_inputs = ["skip"] if kind.startswith("Skip") else []
    return nodes, inits, extra_inputs


@pytest.mark.parametrize("norm", ["LayerNormalization", "SimplifiedLayerNormalization",
                                  "SkipLayerNormalization", "SkipSimplifiedLayerNormalization"])
@pytest.mark.parametrize("linear", ["MatMul", "Gemm"])
def test_fold_into_fused_norm(tmp_path: Path, norm: str, linear: str) -> None:
    rng = np.random.default_rng(0)
    nodes, inits, extra = _norm(norm, rng)
    outputs = []
    for i in range(2):  # two siblings read h: they share one s
        if linear == "MatMul":
            inits[f"w{i}"] = rng.standard_normal((C, N)).astype(np.float32)
            nodes.append(helper.make_node("MatMul", ["h", f"w{i}"], [f"y{i}"], name=f"proj{i}"))
        else:  # [out, in] layout with a bias, as torch.nn.Linear exports to Gemm
            inits[f"w{i}"] = rng.standard_normal((N, C)).astype(np.float32)
            inits[f"b{i}"] = rng.standard_normal(N).astype(np.float32)
            nodes.append(helper.make_node("Gemm", ["h", f"w{i}", f"b{i}"], [f"y{i}"], name=f"proj{i}", transB=1))
        outputs.append(f"y{i}")
    rank = 2 if linear == "Gemm" else 3
    shape = [8, C] if rank == 2 else [1, 8, C]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in ["x", *extra]]
    if norm.startswith("Skip"):
        outputs.append("sum")
    graph = helper.make_graph(nodes, "g", inputs,
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model_proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(MS, 1)])
    path = tmp_path / "m.onnx"
    onnx.save(model_proto, path)

    feeds = [{name: rng.standard_normal(shape).astype(np.float32) * 3 for name in ["x", *extra]} for _ in range(3)]
    model = ir.load(path)
    groups = find_smoothing_groups(model.graph)
    assert len(groups) == 1 and groups[0].absorber is not None, groups[0].reason
    stats = statistics(model, feeds)
    smooth = SmoothPass(stats, {layer.name for layer in find_linear_layers(model.graph)},
                        SmoothSettings(0.5, Unabsorbed.SKIP))
    result = smooth(model)
    assert isinstance(result, SmoothPassResult) and result.modified
    assert result.groups[0].method == norm
    ir.save(model, tmp_path / "s.onnx")

    def run(p: Path) -> list[np.ndarray]:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"])
        return [np.concatenate(r) for r in zip(*(session.run(None, f) for f in feeds), strict=True)]

    for got, expected in zip(run(tmp_path / "s.onnx"), run(path), strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
