"""End to end on the synthetic block: structure of the saved graph, kernels, and error against FP32."""

from pathlib import Path

import numpy as np
import onnx
import pytest

import sqonnx
from sqonnx import CalibrationConfig, QuantizeConfig
from tests.synthetic import activations, build_block, run


def config(feeds: Path, **kwargs: object) -> QuantizeConfig:
    """Static O3 everywhere (these tests read its graph structure), unless a test asks otherwise."""
    kwargs.setdefault("per_token_where_needed", False)
    return QuantizeConfig(calibration=CalibrationConfig(data=feeds, num_samples=8), **kwargs)  # type: ignore[arg-type]


def relative_error(model: Path, reference: Path, x: np.ndarray) -> float:
    """Error of the block's update y - x (the residual would carry x's outliers through untouched)."""
    inputs = x.reshape(-1, *x.shape[2:])
    expected = run(reference, x) - inputs
    return float(np.linalg.norm(run(model, x) - inputs - expected) / np.linalg.norm(expected))


def test_saved_graph_structure(tmp_path: Path, block: Path, feeds: Path) -> None:
    out = tmp_path / "q.onnx"
    report = sqonnx.quantize(block, out, config(feeds))
    proto = onnx.load(str(out))
    onnx.checker.check_model(proto, full_check=True)
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("QuantizeLinear") == 7  # one pair per layer, as onnxruntime's x86 fusion needs
    assert ops.count("DequantizeLinear") == 14
    assert [i.name for i in proto.graph.input] == ["x"] and [o.name for o in proto.graph.output] == ["y"]
    weights = {i.name: i for i in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "DequantizeLinear" and node.name.endswith("weight_DequantizeLinear"):
            assert weights[node.input[0]].data_type == onnx.TensorProto.INT8
            zero_point = onnx.numpy_helper.to_array(weights[node.input[2]])
            assert zero_point.dtype == np.int8 and not zero_point.any()
            codes = onnx.numpy_helper.to_array(weights[node.input[0]])
            assert np.abs(codes).max() <= 63  # reduce_range by default
            assert zero_point.shape == (codes.shape[1],)  # per output channel by default
    assert "/attn/q_proj/MatMul/input_QuantizeLinear" in {n.name for n in proto.graph.node}
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["sqonnx.alpha"] == "0.5" and meta["sqonnx.level"] == "O3"
    assert meta["sqonnx.calibration_samples"] == "8" and meta["sqonnx.quantized_layers"] == "7"
    # onnxruntime fuses every quantized layer into an integer kernel, none left behind a DQ.
    assert report.kernels is not None
    assert report.kernels.integer_total == 7 and report.kernels.unfused == []
    by_name = {layer.name: layer for layer in report.layers}
    assert by_name["/mlp/down_proj/MatMul"].folded_into == "/mlp/up_proj/MatMul"
    assert by_name["/attn/q_proj/MatMul"].smoothing.startswith("Mul")
    assert by_name["/mlp/gate_proj/MatMul"].smoothing == "LayerNormalization"
    assert by_name["/attn/o_proj/MatMul"].scale_min is None
    q = by_name["/attn/q_proj/MatMul"]
    assert q.outlier_ratio_after < q.outlier_ratio_before / 3


def test_smoothing_beats_plain_int8(tmp_path: Path, block: Path, feeds: Path) -> None:
    x = activations(4, seed=7)  # held out from calibration
    sqonnx.quantize(block, tmp_path / "plain.onnx", config(feeds, smooth=False))
    sqonnx.quantize(block, tmp_path / "smooth.onnx", config(feeds, alpha=0.5))
    plain = relative_error(tmp_path / "plain.onnx", block, x)
    smooth = relative_error(tmp_path / "smooth.onnx", block, x)
    assert smooth < 0.3, smooth
    assert smooth < plain / 2, (smooth, plain)


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("reduce_range", [False, True])
def test_weight_options(tmp_path: Path, block: Path, feeds: Path, per_channel: bool, reduce_range: bool) -> None:
    out = tmp_path / "q.onnx"
    # Full range is only allowed for a target whose integer kernels cannot saturate.
    target = sqonnx.Target.PORTABLE if reduce_range else sqonnx.Target.GPU
    report = sqonnx.quantize(block, out, config(feeds, per_channel=per_channel, reduce_range=reduce_range,
                                                target=target))
    assert report.kernels is not None and report.kernels.integer_total == 7 and not report.kernels.unfused
    assert relative_error(out, block, activations(4, seed=7)) < 0.3
    proto = onnx.load(str(out))
    axes = [a.i for n in proto.graph.node if n.name.endswith("weight_DequantizeLinear")
            for a in n.attribute if a.name == "axis"]
    assert len(axes) == (7 if per_channel else 0)


def test_exclude_keeps_layer_in_float(tmp_path: Path, block: Path, feeds: Path) -> None:
    out = tmp_path / "q.onnx"
    report = sqonnx.quantize(block, out, config(feeds, exclude=("*down_proj*",)))
    assert len(report.quantized_layers) == 6
    proto = onnx.load(str(out))
    down = next(n for n in proto.graph.node if n.name == "/mlp/down_proj/MatMul")
    assert down.input[1] == "wd"  # still the float initializer


def test_same_inputs_give_same_bytes(tmp_path: Path, block: Path, feeds: Path) -> None:
    sqonnx.quantize(block, tmp_path / "a.onnx", config(feeds))
    sqonnx.quantize(block, tmp_path / "b.onnx", config(feeds))
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_opset_17_model(tmp_path: Path, feeds: Path) -> None:
    """Before opset 18 ReduceMax takes its axes as an attribute; calibration must give the same result."""
    old = build_block(tmp_path / "m17.onnx", opset=17)
    new = build_block(tmp_path / "m18.onnx", opset=18)
    report = sqonnx.quantize(old, tmp_path / "q17.onnx", config(feeds))
    sqonnx.quantize(new, tmp_path / "q18.onnx", config(feeds))
    assert report.kernels is not None and report.kernels.integer_total == 7
    x = activations(2, seed=3)
    np.testing.assert_allclose(run(tmp_path / "q17.onnx", x), run(tmp_path / "q18.onnx", x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("smooth", [False, True])
def test_tied_weights(tmp_path: Path, feeds: Path, smooth: bool) -> None:
    """q_proj and k_proj read one initializer: quantized once when it stays shared, valid either way."""
    path = build_block(tmp_path / "tied.onnx", shared_weight=True)
    out = tmp_path / "q.onnx"
    report = sqonnx.quantize(path, out, config(feeds, smooth=smooth))
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    assert report.kernels is not None and report.kernels.integer_total == 7 and not report.kernels.unfused
    int8_weights = [i for i in onnx.load(str(out)).graph.initializer if i.name.endswith("_quantized")]
    assert len(int8_weights) == 6  # smoothing scales q and k alike in place; unsmoothed they stay tied
    assert relative_error(out, path, activations(4, seed=7)) < (0.3 if smooth else 1.0)


def test_refuses_an_already_quantized_model(tmp_path: Path, block: Path, feeds: Path) -> None:
    sqonnx.quantize(block, tmp_path / "q.onnx", config(feeds))
    with pytest.raises(sqonnx.SqonnxError, match="already quantized"):
        sqonnx.quantize(tmp_path / "q.onnx", tmp_path / "qq.onnx", config(feeds))
    assert not (tmp_path / "qq.onnx").exists()
