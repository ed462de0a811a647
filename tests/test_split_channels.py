"""Outlier channel splitting for static activations (sqonnx.passes.split_channels): exact in float, the static range
down to the largest channel left whole, INT8 error down, and onnxruntime still runs integer kernels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import sqonnx
from sqonnx import CalibrationConfig, QuantizeConfig
from sqonnx.calibrators import ActivationStats
from sqonnx.passes import split_channels
from sqonnx.passes.smooth import GroupResult
from sqonnx.passes.smoothing_groups import find_smoothing_groups
from sqonnx.passes.split_channels import SplitChannelsPass, SplitResult, plan_split

WIDTH, OUT = 64, 32
MASSIVE = (5, 17)  # channels with massive values on a few tokens, as SmolLM2's down_proj inputs have


def test_plan_splits_the_channels_far_above_the_rest() -> None:
    maxima = np.ones(WIDTH)
    maxima[5], maxima[17], maxima[30] = 12.0, 7.5, 2.0
    split = plan_split(maxima)
    assert split is not None
    # channels 5 and 17 toward channel 30's 2.0, as far as the budget of WIDTH / 16 = 4 added channels goes: the
    # target (12 + 7.5) / 4 = 4.875, so 3 and 2 copies (3 added), the largest left 12 / 3 = 4
    assert split.added == 3
    assert list(split.source[:WIDTH]) == list(range(WIDTH)) and sorted(split.source[WIDTH:]) == [5, 5, 17]
    assert split.copies[5] == 3 and split.copies[17] == 2 and split.copies[30] == 1
    assert np.max(maxima[split.source] / split.copies) == pytest.approx(4.0)  # 12 / 3
    assert plan_split(np.ones(WIDTH)) is None  # nothing to gain
    flat = np.ones(WIDTH)
    flat[0] = 1.5
    assert plan_split(flat) is None  # under SPLIT_FROM


def _model(path: Path) -> Path:
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((WIDTH, OUT)) * 0.2).astype(np.float32)
    w2 = (rng.standard_normal((WIDTH, OUT)) * 0.2).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["h"], name="relu"),
         helper.make_node("MatMul", ["h", "w"], ["y"], name="/down/MatMul"),
         helper.make_node("MatMul", ["h", "w2"], ["y2"], name="/side/MatMul")], "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", OUT]),
         helper.make_tensor_value_info("y2", TensorProto.FLOAT, ["batch", "seq", OUT])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(w2, "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def _samples(count: int, massive: tuple[float, float] = (400.0, 250.0)) -> np.ndarray:
    x = np.abs(np.random.default_rng(1).standard_normal((count, 1, 16, WIDTH))).astype(np.float32)
    x[:, :, 0, MASSIVE[0]] = massive[0]  # the first token only
    x[:, :, 0, MASSIVE[1]] = massive[1]
    return x


def _run(path: Path | bytes, x: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(path if isinstance(path, bytes) else str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})


def test_split_is_exact_in_float(tmp_path: Path) -> None:
    """The pass alone, on the float graph with smoothing factors s: both readers compute what they did (float64
    check at 1e-5), from one Gather and Mul; the statistics of the new activation are the old ones gathered."""
    path = _model(tmp_path / "m.onnx")
    model = ir.load(path)
    x = _samples(2)
    before = _run(path, x[0])
    group = find_smoothing_groups(model.graph)[0]
    maxima = np.abs(x).max(axis=(0, 1, 2))
    rows = np.abs(x).reshape(-1, WIDTH)[:8]
    stats = ActivationStats({"h": maxima}, {"h": rows})
    scales = np.full(WIDTH, 2.0, np.float32)  # as if smoothed: the producer divides by s, the weights times s
    result = SplitChannelsPass([GroupResult(group, scales, "relu", "test")], stats, {"/down/MatMul", "/side/MatMul"})(
        model)
    assert isinstance(result, SplitResult) and result.modified and result.stats is not None
    new = result.groups[0]
    name = str(new.group.activation.name)
    assert [n.op_type for n in model.graph][:3] == ["Relu", "Gather", "Mul"]
    assert [layer.weight.shape[0] for layer in new.group.layers] == [WIDTH + 2 + 1] * 2  # 3 and 2 copies (budget 4)
    after = _run(ir.to_proto(model).SerializeToString(), x[0])
    for a, b in zip(before, after, strict=True):
        np.testing.assert_allclose(b.astype(np.float64), a.astype(np.float64), rtol=1e-5, atol=1e-5)
    assert new.scales is not None
    split_max = result.stats.channel_max[name] / new.scales
    assert split_max.max() == pytest.approx((maxima / scales).max() / 3, rel=1e-6)
    indices = model.graph.initializers["h/split/indices"].const_value.numpy()
    np.testing.assert_array_equal(result.stats.rows[name], rows[:, indices])
    assert result.stats.rows[name].shape == (8, WIDTH + 3)


def _quantize(tmp_path: Path, name: str) -> tuple[Path, np.ndarray]:
    path = _model(tmp_path / "m.onnx")
    x = _samples(8, massive=(40.0, 25.0))  # after smoothing at α 0.5 about 6 and 5 times the rest: within the budget
    np.savez(tmp_path / "feeds.npz", x=x)
    out = tmp_path / name / "q.onnx"
    config = QuantizeConfig(per_token_where_needed=False, alpha=0.5,
                            calibration=CalibrationConfig(data=tmp_path / "feeds.npz", num_samples=8))
    report = sqonnx.quantize(path, out, config)
    assert any("split" in layer.smoothing for layer in report.layers) == (name == "split")
    return out, x


def _error(model: Path, reference: Path, x: np.ndarray) -> float:
    fp, q = np.concatenate([_run(reference, s)[0] for s in x]), np.concatenate([_run(model, s)[0] for s in x])
    return float(np.linalg.norm(q[:, 1:] - fp[:, 1:]) / np.linalg.norm(fp[:, 1:]))  # the ordinary tokens


def test_static_int8_error_falls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--static: the massive channels split, the other tokens' INT8 error falls; the layers stay INT8 (onnxruntime
    runs MatMulIntegerToFloat), and the graph's Gather and Mul come before the QuantizeLinear."""
    split, x = _quantize(tmp_path, "split")
    monkeypatch.setattr(split_channels, "SPLIT_FROM", float("inf"))
    whole, _ = _quantize(tmp_path, "whole")
    reference = tmp_path / "m.onnx"
    assert _error(split, reference, x) < 0.8 * _error(whole, reference, x)
    graph = onnx.load(str(split)).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("Gather") == 1 and ops.index("Gather") < ops.index("QuantizeLinear")
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(split), options, providers=["CPUExecutionProvider"])
    optimized = [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]
    assert optimized.count("MatMulIntegerToFloat") == 2 and "MatMul" not in optimized


def test_split_in_float16_for_tensorrt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A float16 model for TensorRT is quantized in float16 (no float32 islands): its outlier channels are split in
    float16 too (Gather and a float16 Mul before the float16 QuantizeLinear), and the other tokens' error falls."""
    model = ir.load(_model(tmp_path / "m32.onnx"))
    for value in model.graph.initializers.values():
        value.const_value = ir.tensor(value.const_value.numpy().astype(np.float16), name=value.name)
        value.type = ir.TensorType(ir.DataType.FLOAT16)
    for value in (*model.graph.inputs, *model.graph.outputs):
        value.type = ir.TensorType(ir.DataType.FLOAT16)
    ir.save(model, tmp_path / "m.onnx")
    x = _samples(8, massive=(40.0, 25.0)).astype(np.float16)
    np.savez(tmp_path / "feeds.npz", x=x)
    config = QuantizeConfig(per_token_where_needed=False, alpha=0.5, target=sqonnx.Target.TENSORRT,
                            calibration=CalibrationConfig(data=tmp_path / "feeds.npz", num_samples=8))
    report = sqonnx.quantize(tmp_path / "m.onnx", tmp_path / "split.onnx", config)
    assert any("split" in layer.smoothing for layer in report.layers)
    graph = onnx.load(str(tmp_path / "split.onnx")).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("Gather") == 1 and ops.index("Mul") < ops.index("QuantizeLinear") and "Cast" not in ops
    factors = next(t for t in graph.initializer if t.name.endswith("split/factors"))
    assert factors.data_type == TensorProto.FLOAT16
    monkeypatch.setattr(split_channels, "SPLIT_FROM", float("inf"))
    sqonnx.quantize(tmp_path / "m.onnx", tmp_path / "whole.onnx", config)
    reference = tmp_path / "m.onnx"
    assert _error(tmp_path / "split.onnx", reference, x) < 0.8 * _error(tmp_path / "whole.onnx", reference, x)
