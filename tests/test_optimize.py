"""--optimize: onnxruntime's transformer optimizer fuses norms before smoothing; the smoothing passes
absorb 1/s into the fused ops and the result stays as accurate as without it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

import sqonnx
from sqonnx import CalibrationConfig, QuantizeConfig, SqonnxError
from tests.synthetic import activations, run


def with_config(block: Path, folder: Path, model_type: str | None) -> Path:
    folder.mkdir()
    model = Path(shutil.copy(block, folder / "model.onnx"))
    if model_type is not None:
        (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
    return model


def update_error(model: Path, reference: Path) -> float:
    import numpy as np

    x = activations(4, seed=7)
    inputs = x.reshape(-1, *x.shape[2:])
    expected = run(reference, x) - inputs
    return float(np.linalg.norm(run(model, x) - inputs - expected) / np.linalg.norm(expected))


def test_optimize_fuses_and_smooths_through_fused_norms(tmp_path: Path, block: Path, feeds: Path) -> None:
    model = with_config(block, tmp_path / "m", "bert")
    calibration = CalibrationConfig(data=feeds, num_samples=8)
    plain = sqonnx.quantize(model, tmp_path / "plain.onnx", QuantizeConfig(calibration=calibration))
    fused = sqonnx.quantize(model, tmp_path / "fused.onnx", QuantizeConfig(calibration=calibration, optimize=True))
    ops = {n.op_type for n in onnx.load(str(tmp_path / "fused.onnx")).graph.node}
    assert "SkipLayerNormalization" in ops and "LayerNormalization" not in ops
    assert "SkipLayerNormalization" in str(fused.settings["optimize"])
    by_name = {layer.name: layer for layer in fused.layers}
    assert by_name["/mlp/gate_proj/MatMul"].smoothing == "SkipLayerNormalization"
    assert len(fused.smoothed_layers) == len(plain.smoothed_layers)
    assert fused.kernels is not None and fused.kernels.integer_total == 7 and not fused.kernels.unfused
    assert update_error(tmp_path / "fused.onnx", block) < 1.05 * update_error(tmp_path / "plain.onnx", block) + 1e-3


@pytest.mark.parametrize(("model_type", "message"), [(None, "needs the model's config.json"),
                                                     ("wavenet", "does not know the 'wavenet' architecture")])
def test_optimize_needs_a_known_architecture(tmp_path: Path, block: Path, feeds: Path, model_type: str | None,
                                             message: str) -> None:
    model = with_config(block, tmp_path / "m", model_type)
    with pytest.raises(SqonnxError, match=message):
        sqonnx.quantize(model, tmp_path / "q.onnx", QuantizeConfig(
            optimize=True, calibration=CalibrationConfig(data=feeds, num_samples=2)))
    assert not (tmp_path / "q.onnx").exists()


@pytest.mark.zoo
def test_optimized_rms_norm_decoder_is_rotated_exactly(tmp_path: Path) -> None:
    """--optimize fuses Llama's RMSNorms into (Skip)SimplifiedLayerNormalization; the rotation goes through
    the fused norms as it does through onnxruntime-genai's, and smoothing-only stays exact."""
    pytest.importorskip("optimum.exporters.onnx")
    from models import zoo

    model = zoo.build("llama")
    data = zoo.save_npz(model, tmp_path / "calib.npz", samples=4, seq=32, seed=0)
    out = tmp_path / "smoothed.onnx"
    report = sqonnx.quantize(model, out, sqonnx.QuantizeConfig(
        optimize=True, smooth_only=True, calibration=sqonnx.CalibrationConfig(data=data, num_samples=4)))
    assert str(report.settings["rotation"]).startswith("rotated"), report.settings["rotation"]
    assert "SimplifiedLayerNormalization" in str(report.settings["optimize"])
    held_out = zoo.feeds(model, 2, 32, seed=7)
    reference, got = zoo.logits(model, held_out), zoo.logits(out, held_out)
    assert np.abs(got - reference).max() / np.abs(reference).max() < 1e-4
