"""o_proj smoothed through v_proj: grouped-query attention (4 query heads over 2 KV heads) with a real
softmax, the KV-head repeat written as Unsqueeze -> Expand -> Reshape, and a v_proj bias, as optimum
exports Llama and BERT."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import sqonnx
from sqonnx import CalibrationConfig, QuantizeConfig
from sqonnx.config import Unabsorbed
from sqonnx.graph.layers import find_linear_layers
from sqonnx.passes.absorbers import ValueAbsorber
from sqonnx.passes.smooth import GroupResult, SmoothPass, SmoothSettings
from sqonnx.passes.smoothing_groups import find_smoothing_groups
from tests.calibrate import statistics
from tests.synthetic import run

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, SEQ = 32, 4, 2, 8, 12
OUTLIER_VALUE_CHANNELS = (3, 13)  # KV head 0 dim 3, KV head 1 dim 5


def build_attention(path: Path) -> Path:
    rng = np.random.default_rng(0)

    def w(*shape: int, scale: float = 0.3) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    kv = KV_HEADS * HEAD_DIM
    wv, wo = w(HIDDEN, kv), w(HIDDEN, HIDDEN)
    wv[:, list(OUTLIER_VALUE_CHANNELS)] *= 60.0  # value channels with ~60x larger values
    expected_map = expected_channel_map()
    for channel in OUTLIER_VALUE_CHANNELS:
        wo[expected_map == channel] /= 60.0  # ... read by small o_proj rows, as in trained models
    inits = {
        "norm.weight": (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32),
        "wq": w(HIDDEN, HIDDEN), "wk": w(HIDDEN, kv), "wv": wv, "v.bias": w(kv, scale=0.5), "wo": wo,
        "q_shape": np.array([0, 0, HEADS, HEAD_DIM], np.int64),
        "kv_shape": np.array([0, 0, KV_HEADS, HEAD_DIM], np.int64),
        "axis2": np.array([2], np.int64), "expand": np.array([1, KV_HEADS, HEADS // KV_HEADS, 1, 1], np.int64),
        "rep_shape": np.array([1, HEADS, -1, HEAD_DIM], np.int64), "out_shape": np.array([0, 0, HIDDEN], np.int64),
        "inv_sqrt": np.array(1 / np.sqrt(HEAD_DIM), np.float32),
    }

    def heads(name: str, src: str, shape: str, repeat: bool) -> list[onnx.NodeProto]:
        nodes = [helper.make_node("Reshape", [src, shape], [f"{name}.r"], name=f"/attn/{name}/Reshape"),
                 helper.make_node("Transpose", [f"{name}.r"], [f"{name}.t"], name=f"/attn/{name}/Transpose",
                                  perm=[0, 2, 1, 3])]
        if repeat:
            nodes += [
                helper.make_node("Unsqueeze", [f"{name}.t", "axis2"], [f"{name}.u"], name=f"/attn/{name}/Unsqueeze"),
                helper.make_node("Expand", [f"{name}.u", "expand"], [f"{name}.e"], name=f"/attn/{name}/Expand"),
                helper.make_node("Reshape", [f"{name}.e", "rep_shape"], [f"{name}.h"], name=f"/attn/{name}/Reshape_1")]
        else:
            nodes.append(
                helper.make_node("Identity", [f"{name}.t"], [f"{name}.h"], name=f"/attn/{name}/Identity"))
        return nodes

    nodes = [
        helper.make_node("Mul", ["x", "norm.weight"], ["h"], name="/norm/Mul"),
        helper.make_node("MatMul", ["h", "wq"], ["q"], name="/attn/q_proj/MatMul"),
        helper.make_node("MatMul", ["h", "wk"], ["k"], name="/attn/k_proj/MatMul"),
        helper.make_node("MatMul", ["h", "wv"], ["v0"], name="/attn/v_proj/MatMul"),
        helper.make_node("Add", ["v0", "v.bias"], ["v"], name="/attn/v_proj/Add"),
        *heads("q", "q", "q_shape", False), *heads("k", "k", "kv_shape", True), *heads("v", "v", "kv_shape", True),
        helper.make_node("Transpose", ["k.h"], ["k.T"], name="/attn/k/Transpose_1", perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["q.h", "k.T"], ["scores"], name="/attn/MatMul"),
        helper.make_node("Mul", ["scores", "inv_sqrt"], ["scaled"], name="/attn/Mul"),
        helper.make_node("Softmax", ["scaled"], ["probs"], name="/attn/Softmax", axis=-1),
        helper.make_node("MatMul", ["probs", "v.h"], ["ctx"], name="/attn/MatMul_1"),
        helper.make_node("Transpose", ["ctx"], ["ctx.t"], name="/attn/Transpose", perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["ctx.t", "out_shape"], ["attn_out"], name="/attn/Reshape"),
        helper.make_node("MatMul", ["attn_out", "wo"], ["y"], name="/attn/o_proj/MatMul"),
    ]
    graph = helper.make_graph(nodes, "gqa", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "seq", HIDDEN])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "seq", HIDDEN])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def expected_channel_map() -> np.ndarray:
    c = np.arange(HIDDEN)
    return (c // HEAD_DIM // (HEADS // KV_HEADS)) * HEAD_DIM + c % HEAD_DIM


def inputs(samples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((samples, 1, SEQ, HIDDEN)).astype(np.float32)


def o_proj_group(path: Path):  # noqa: ANN201
    model = ir.load(path)
    groups = find_smoothing_groups(model.graph)
    return model, groups, next(g for g in groups if g.layers[0].name == "/attn/o_proj/MatMul")


def test_finds_v_proj_and_measures_the_gqa_channel_map(tmp_path: Path) -> None:
    """The walk finds v_proj; the labelled replay during calibration gives the grouped-query map without
    any head count (no config.json here)."""
    path = build_attention(tmp_path / "m.onnx")
    model, _, group = o_proj_group(path)
    assert isinstance(group.absorber, ValueAbsorber)
    assert group.absorber.layer_name == "/attn/v_proj/MatMul"
    assert str(group.absorber.path.values.name) == "v"  # after the bias: what attention mixes
    stats = statistics(model, ({"x": s} for s in inputs(2, 1)))
    np.testing.assert_array_equal(stats.maps[str(group.activation.name)], expected_channel_map())


def smooth(path: Path, out: Path, wrong_map: bool = False) -> list[GroupResult]:
    model, _, group = o_proj_group(path)
    stats = statistics(model, ({"x": s} for s in inputs(4, 1)))
    if wrong_map:  # as if 2 heads were assumed: pairs output channels with the wrong value channels
        index = np.arange(HIDDEN)
        stats.maps[str(group.activation.name)] = (index // (HIDDEN // 2) // 2) * HEAD_DIM + index % HEAD_DIM
    layers = {layer.name for layer in find_linear_layers(model.graph)}
    result = SmoothPass(stats, layers, SmoothSettings(0.5, Unabsorbed.SKIP))(model)
    ir.save(model, out)
    return result.groups


def test_fold_is_exact_and_shares_s_across_query_heads(tmp_path: Path) -> None:
    path = build_attention(tmp_path / "m.onnx")
    result = smooth(path, tmp_path / "s.onnx")
    o_proj = next(r for r in result if r.group.layers[0].name == "/attn/o_proj/MatMul")
    assert o_proj.method == "MatMul (value columns)" and o_proj.scales is not None
    channel_map = expected_channel_map()
    for value_channel in range(KV_HEADS * HEAD_DIM):  # query heads of one KV head share its s
        assert len(set(o_proj.scales[channel_map == value_channel].tolist())) == 1
    x = inputs(3, seed=9)
    expected = run(path, x)
    np.testing.assert_allclose(run(tmp_path / "s.onnx", x), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_wrong_channel_map_is_caught_by_calibration(tmp_path: Path) -> None:
    """A wrong map breaks the bound |attention output| <= max |mixed value channel| on calibration data,
    and nothing is folded."""
    path = build_attention(tmp_path / "m.onnx")
    result = smooth(path, tmp_path / "s.onnx", wrong_map=True)
    o_proj = next(r for r in result if r.group.layers[0].name == "/attn/o_proj/MatMul")
    assert o_proj.scales is None and "exceed the value channels" in o_proj.method


@pytest.mark.parametrize("smooth_it", [True, False])
def test_quantized_o_proj_end_to_end(tmp_path: Path, smooth_it: bool) -> None:
    path = build_attention(tmp_path / "model.onnx")
    np.savez(tmp_path / "f.npz", x=inputs(8, 1))
    report = sqonnx.quantize(path, tmp_path / "q.onnx", QuantizeConfig(
        smooth=smooth_it, calibration=CalibrationConfig(data=tmp_path / "f.npz", num_samples=8)))
    o_proj = next(layer for layer in report.layers if layer.name == "/attn/o_proj/MatMul")
    x = inputs(4, seed=9)
    expected = run(path, x)
    error = float(np.linalg.norm(run(tmp_path / "q.onnx", x) - expected) / np.linalg.norm(expected))
    if smooth_it:
        assert o_proj.smoothing == "MatMul (value columns)" and o_proj.folded_into == "/attn/v_proj/MatMul"
        assert o_proj.outlier_ratio_after < o_proj.outlier_ratio_before / 3
        assert error < 0.05, error
    else:
        assert o_proj.scale_min is None
        assert error > 0.05, error  # what the fold buys: the unsmoothed o_proj input has 60x channels
