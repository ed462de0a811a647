"""Property tests: on random small graphs with random outlier channels, the smoothing fold is exact and
quantized error is never much worse than without smoothing."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import numpy_helper

import sqonnx
from sqonnx.config import Unabsorbed
from sqonnx.graph.layers import find_linear_layers
from sqonnx.passes.smooth import SmoothPass, SmoothSettings
from tests.calibrate import statistics
from tests.synthetic import build_block, run, save_feeds


def _inputs(seed: int, samples: int, outliers: list[int], magnitude: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((samples, 1, 8, 32)).astype(np.float32)
    x[..., outliers] *= magnitude
    return x


def _float64(path: Path) -> Path:
    """The same graph with float64 weights, inputs and outputs."""
    model = onnx.load(str(path))
    for tensor in model.graph.initializer:
        if tensor.data_type == onnx.TensorProto.FLOAT:
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float64), tensor.name))
    for value in [*model.graph.input, *model.graph.output]:
        value.type.tensor_type.elem_type = onnx.TensorProto.DOUBLE
    del model.graph.value_info[:]
    out = path.with_suffix(".f64.onnx")
    onnx.save(model, str(out))
    return out


graphs = st.fixed_dictionaries({
    "seed": st.integers(0, 10_000),
    "bias": st.booleans(),
    "shared": st.booleans(),
    "alpha": st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0]),
    "outliers": st.lists(st.integers(0, 31), min_size=0, max_size=4, unique=True),
    "magnitude": st.sampled_from([1.0, 10.0, 100.0, 1000.0]),
})


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(graphs)
def test_fold_is_exact(case: dict) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = build_block(Path(tmp) / "m.onnx", bias=case["bias"], shared_weight=case["shared"], seed=case["seed"])
        x = _inputs(case["seed"], 3, case["outliers"], case["magnitude"])
        model = ir.load(path)
        stats = statistics(model, ({"x": s} for s in x))
        layers = {layer.name for layer in find_linear_layers(model.graph)}
        SmoothPass(stats, layers, SmoothSettings(case["alpha"], Unabsorbed.MUL))(model)
        ir.save(model, Path(tmp) / "s.onnx")
        # The fold's constants were computed in float32; evaluated in float64 the smoothed graph must
        # still equal the original up to float32 rounding of those constants, whatever the outliers.
        expected = run(_float64(path), x.astype(np.float64))
        got = run(_float64(Path(tmp) / "s.onnx"), x.astype(np.float64))
        assert np.all(np.isfinite(got))
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(graphs)
def test_smoothing_never_much_worse(case: dict) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        path = build_block(folder / "m.onnx", bias=case["bias"], shared_weight=case["shared"], seed=case["seed"])
        x = _inputs(case["seed"], 4, case["outliers"], case["magnitude"])
        feeds = save_feeds(folder / "f.npz", x)
        errors = {}
        for name, smooth in (("plain", False), ("smooth", True)):
            config = sqonnx.QuantizeConfig(alpha=0.5, smooth=smooth, verify_fusion=False,
                                           calibration=sqonnx.CalibrationConfig(data=feeds, num_samples=4))
            sqonnx.quantize(path, folder / f"{name}.onnx", config)
            inputs = x.reshape(-1, *x.shape[2:])
            expected = run(path, x) - inputs
            diff = run(folder / f"{name}.onnx", x) - inputs - expected
            errors[name] = float(np.linalg.norm(diff) / np.linalg.norm(expected))
        assert errors["smooth"] <= 1.5 * errors["plain"] + 0.02, errors
