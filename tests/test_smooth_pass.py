"""Smoothing alone must leave the model's outputs equal to FP32 (it is exact in real arithmetic)."""

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from sqonnx.config import Unabsorbed
from sqonnx.graph.layers import find_linear_layers
from sqonnx.passes.smooth import SmoothPass, SmoothPassResult, SmoothSettings
from tests.calibrate import statistics
from tests.synthetic import activations, build_block, run


def smooth_model(path: Path, out: Path, x: np.ndarray, unabsorbed: Unabsorbed,
                 alpha: float = 0.5) -> tuple[SmoothPass, SmoothPassResult]:
    model = ir.load(path)
    stats = statistics(model, ({"x": s} for s in x))
    layers = {layer.name for layer in find_linear_layers(model.graph)}
    smooth = SmoothPass(stats, layers, SmoothSettings(alpha, unabsorbed))
    result = smooth(model)
    assert isinstance(result, SmoothPassResult) and result.modified
    ir.save(model, out)
    return smooth, result


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shared_weight", [False, True])
@pytest.mark.parametrize("unabsorbed", list(Unabsorbed))
def test_smoothing_keeps_outputs(tmp_path: Path, bias: bool, shared_weight: bool, unabsorbed: Unabsorbed) -> None:
    path = build_block(tmp_path / "m.onnx", bias=bias, shared_weight=shared_weight)
    x = activations(4)
    smooth, result = smooth_model(path, tmp_path / "s.onnx", x, unabsorbed)
    expected = run(path, x)
    got = run(tmp_path / "s.onnx", x)
    scale = np.abs(expected).max()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * scale)
    smoothed = [r for r in result.groups if r.scales is not None]
    assert len(smoothed) == (4 if unabsorbed is Unabsorbed.MUL else 3)
    # The scales really moved something: outlier channels got large s.
    assert max(float(r.scales.max() / r.scales.min()) for r in smoothed) > 10


def test_explicit_mul_only_where_nothing_absorbs(tmp_path: Path, block: Path) -> None:
    smooth_model(block, tmp_path / "s.onnx", activations(2), Unabsorbed.MUL)
    muls = [n for n in ir.load(tmp_path / "s.onnx").graph if n.name.endswith("/SmoothMul")]
    assert [n.name for n in muls] == ["/attn/o_proj/MatMul/SmoothMul"]


def test_smoothing_handles_zero_channels_and_rows(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An input channel that is always zero and an all-zero weight row: s stays finite, the fold exact,
    and the user is told."""
    path = build_block(tmp_path / "m.onnx")
    model = ir.load(path)
    for name in ("wg", "wu"):  # gate_proj's and up_proj's row 9 (one shared input channel) are all zero
        weight = model.graph.initializers[name]
        array = weight.const_value.numpy().copy()
        array[9] = 0.0
        weight.const_value = ir.tensor(array, name=name)
    ir.save(model, path)
    x = activations(2)
    x[..., 7] = 0.0  # an input channel that is always zero
    with caplog.at_level("WARNING"):
        smooth, result = smooth_model(path, tmp_path / "s.onnx", x, Unabsorbed.SKIP)
    assert all(np.all(np.isfinite(r.scales)) for r in result.groups if r.scales is not None)
    expected = run(path, x)
    np.testing.assert_allclose(run(tmp_path / "s.onnx", x), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    # One summary line for all groups, not one per group (Gemma-3-270M printed 18 near-identical lines).
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1, warnings
    assert "2 layer groups (/attn/q_proj/MatMul, /mlp/gate_proj/MatMul) have 1 input channels that were zero" \
        in warnings[0] and "1 all-zero weight rows" in warnings[0]


def test_second_run_changes_nothing(tmp_path: Path, block: Path) -> None:
    x = activations(2)
    smooth, result = smooth_model(block, tmp_path / "s.onnx", x, Unabsorbed.SKIP)
    model = ir.load(tmp_path / "s.onnx")
    before = {k: v.const_value.numpy().copy() for k, v in model.graph.initializers.items()}
    again = SmoothPass(smooth.stats, set(smooth.quantized), SmoothSettings(0.5, Unabsorbed.SKIP))(model)
    assert not again.modified
    for name, array in before.items():
        np.testing.assert_array_equal(model.graph.initializers[name].const_value.numpy(), array)


def test_calibrator_matches_numpy(tmp_path: Path, block: Path) -> None:
    """The streaming ReduceMax statistics equal max|x| computed from the whole input."""
    x = activations(5)
    model = ir.load(block)
    stats = statistics(model, ({"x": s} for s in x), activations={"x": 32}).channel_max
    np.testing.assert_allclose(stats["x"], np.abs(x).reshape(-1, 32).max(axis=0), rtol=1e-6)
    # The calibrator cleans up after itself: the model is unchanged.
    assert [o.name for o in model.graph.outputs] == ["y"]
    assert not any(n.name.startswith("sqonnx_calib") for n in model.graph)
