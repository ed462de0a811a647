"""Levels O1/O2/O3 in both output forms on the synthetic block: ops in the saved graph, kernels onnxruntime
runs, error against FP32, and onnxruntime's fused kernels computing what the plain graph says."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import sqonnx
from sqonnx import CalibrationConfig, Format, Level, QuantizeConfig
from tests.synthetic import activations, run

# The block has 7 linear layers reading 4 distinct activations: h (q/k/v), ctx (o), g (gate/up), m (down).
EXPECTED_OPS = {
    (Level.O3, Format.QDQ): {"QuantizeLinear": 7, "DequantizeLinear": 14},
    (Level.O3, Format.QOPERATOR): {"QuantizeLinear": 4, "MatMulInteger": 7, "DequantizeLinear": 0},
    (Level.O2, Format.QDQ): {"DynamicQuantizeLinear": 7, "DequantizeLinear": 14},
    (Level.O2, Format.QOPERATOR): {"DynamicQuantizeLinear": 4, "MatMulInteger": 7, "DequantizeLinear": 0},
    # O1 has no Q/DQ spelling: both forms write per-token quantization from standard ops.
    (Level.O1, Format.QDQ): {"ReduceMax": 4, "MatMulInteger": 7, "QuantizeLinear": 0, "DequantizeLinear": 0},
    (Level.O1, Format.QOPERATOR): {"ReduceMax": 4, "MatMulInteger": 7, "QuantizeLinear": 0, "DequantizeLinear": 0},
}


def quantize(block: Path, feeds: Path, out: Path, level: Level, fmt: Format) -> sqonnx.QuantizeReport:
    config = QuantizeConfig(level=level, format=fmt, per_token_where_needed=False,
                            calibration=CalibrationConfig(data=feeds, num_samples=8))
    return sqonnx.quantize(block, out, config)


def update_error(model: Path, reference: Path, x: np.ndarray) -> float:
    inputs = x.reshape(-1, *x.shape[2:])
    expected = run(reference, x) - inputs
    return float(np.linalg.norm(run(model, x) - inputs - expected) / np.linalg.norm(expected))


def run_at(model: Path, x: np.ndarray, level: ort.GraphOptimizationLevel) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.log_severity_level = 3
    return ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize("fmt", list(Format))
@pytest.mark.parametrize("level", list(Level))
def test_level_and_form(tmp_path: Path, block: Path, feeds: Path, level: Level, fmt: Format) -> None:
    out = tmp_path / "q.onnx"
    report = quantize(block, feeds, out, level, fmt)
    proto = onnx.load(str(out))
    onnx.checker.check_model(proto, full_check=True)
    ops = collections.Counter(node.op_type for node in proto.graph.node)
    for op, count in EXPECTED_OPS[(level, fmt)].items():
        assert ops[op] == count, (op, dict(ops))
    integer_form = fmt is Format.QOPERATOR or level is Level.O1
    assert ops["MatMul"] == (0 if integer_form else 7)  # QDQ keeps float MatMuls between DQs, for runtimes to fuse
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["sqonnx.level"] == level.value
    assert meta["sqonnx.format"] == ("qoperator" if level is Level.O1 else fmt.value)
    # onnxruntime runs every layer on an integer kernel and dequantizes no weight at run time.
    assert report.kernels is not None and report.kernels.integer_total == 7
    assert report.kernels.float_linear == 0 and report.kernels.dequantize_nodes == 0 and not report.kernels.unfused
    # The block's o_proj input carries unsmoothable outliers: per-tensor static (O3) pays for them,
    # dynamic levels adapt to each input.
    error = update_error(out, block, activations(4, seed=7))
    assert error < {Level.O1: 0.04, Level.O2: 0.05, Level.O3: 0.35}[level], error


def test_finer_levels_are_more_accurate(tmp_path: Path, block: Path, feeds: Path) -> None:
    x = activations(4, seed=7)
    errors = {}
    for level in Level:
        out = tmp_path / f"{level.value}.onnx"
        quantize(block, feeds, out, level, Format.QDQ)
        errors[level] = update_error(out, block, x)
    assert errors[Level.O1] < errors[Level.O2] < errors[Level.O3], errors


@pytest.mark.parametrize("level", list(Level))
def test_fused_kernels_match_the_graph(tmp_path: Path, block: Path, feeds: Path, level: Level) -> None:
    """onnxruntime's fusions (MatMulIntegerToFloat, DynamicQuantizeMatMul) must compute what the unfused
    standard ops compute. Rows of very different size give per-token scales that differ: onnxruntime 1.32
    scales a bias folded into MatMulIntegerToFloat by a per-row scale, which the O1 pass must avoid."""
    out = tmp_path / "q.onnx"
    quantize(block, feeds, out, level, Format.QOPERATOR)
    x = activations(1, seed=3)[0]
    x[0, 5:] *= 0.01
    plain = run_at(out, x, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    fused = run_at(out, x, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    assert np.abs(fused - plain).max() <= 1e-4 * np.abs(plain).max()


@pytest.mark.parametrize("level", [Level.O1, Level.O2])
def test_per_token_rows_are_independent(tmp_path: Path, block: Path, feeds: Path, level: Level) -> None:
    """O1: one token's result does not depend on the other tokens (its scale is its own row's max);
    at O2 the one per-tensor scale follows the loudest token. The block itself mixes no tokens."""
    out = tmp_path / "q.onnx"
    quantize(block, feeds, out, level, Format.QDQ)
    x = activations(1, seed=5)[0]
    louder = x.copy()
    louder[0, 1:] *= 50.0  # every token but the first gets much larger
    first = run_at(out, x, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)[0, 0]
    changed = np.abs(run_at(out, louder, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)[0, 0] - first).max()
    if level is Level.O1:
        assert changed <= 1e-5
    else:
        assert changed > 1e-2


def test_level_auto_mixes_static_and_per_token(tmp_path: Path, block: Path, feeds: Path) -> None:
    """--level auto: the groups whose outlier rows a static range cannot hold (q/k/v, down_proj of the block)
    go per-token; the others stay static; both kinds fuse into integer kernels and the error drops."""
    x = activations(4, seed=5)
    expected = run(block, x)
    errors = {}
    for auto in (False, True):
        out = tmp_path / f"auto{auto}.onnx"
        report = sqonnx.quantize(block, out, QuantizeConfig(per_token_where_needed=auto, calibration=CalibrationConfig(
            data=feeds, num_samples=8)))
        assert report.kernels is not None and report.kernels.integer_total == 7 and not report.kernels.unfused
        errors[auto] = float(np.linalg.norm(run(out, x) - expected) / np.linalg.norm(expected))
    levels = {layer.name.split("/")[2]: layer.level for layer in report.layers}
    assert levels == {"q_proj": "O1", "k_proj": "O1", "v_proj": "O1", "o_proj": "O3", "gate_proj": "O3",
                      "up_proj": "O3", "down_proj": "O1"}, levels
    assert errors[True] < errors[False], errors
