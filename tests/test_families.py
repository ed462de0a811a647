"""Every family of the zoo: each linear layer found, every quantized one on an integer kernel in
onnxruntime's optimized graph, the smoothed layers per absorber kind, and smoothing alone exact.

The expected counts are per family (2 layers each); the LM head, when it has a constant weight of its
own (untied), reads the final norm and is smoothed through it in the smoothing-only run, where nothing
is excluded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import sqonnx
from sqonnx import CalibrationConfig, QuantizeConfig
from tests import zoo

NORM_MUL, LN = "Mul (per-channel weight)", "LayerNormalization"
VALUE, GATED = "MatMul (value columns)", "MatMul (output columns through Mul)"
LLAMA_LIKE = {NORM_MUL: 11, VALUE: 2, GATED: 2}  # q/k/v + gate/up per layer and the LM head; o_proj; down
EXPECTED_SMOOTHED: dict[str, dict[str, int]] = {
    "llama": LLAMA_LIKE, "mistral": LLAMA_LIKE, "qwen2": LLAMA_LIKE, "qwen3": LLAMA_LIKE, "gemma3": LLAMA_LIKE,
    "phi3": {NORM_MUL: 5, VALUE: 2, GATED: 2},  # fused qkv_proj and gate_up_proj
    "mixtral": {NORM_MUL: 25, VALUE: 2, GATED: 8},  # router + 4 experts' w1/w3 share the norm; w2 via w3
    "opt": {LN: 8, VALUE: 2, "Gemm (output columns through Relu)": 2},
    "bloom": {LN: 4, VALUE: 2}, "gpt2": {LN: 4, "Gemm (value columns)": 2}, "phi": {LN: 9, VALUE: 2},
    "falcon": {LN: 4, VALUE: 2, NORM_MUL: 2}, "falcon_old": {LN: 4, VALUE: 2, NORM_MUL: 2},
    "gpt_neox": {LN: 5, VALUE: 2, NORM_MUL: 2},
    "bert": {VALUE: 2, NORM_MUL: 2}, "roberta": {VALUE: 2, NORM_MUL: 2},
}


def _calibration(model: Path, tmp_path: Path) -> CalibrationConfig:
    return CalibrationConfig(data=zoo.save_npz(model, tmp_path / "calib.npz", samples=4, seq=32, seed=0),
                             num_samples=4)


def _relative_error(model: Path, other: Path, norm: str = "max") -> float:
    """Largest |difference| over the largest |logit| ("max"), or the relative L2 error ("l2"), on held-out
    windows."""
    held_out = zoo.feeds(model, 2, 32, seed=7)
    reference, got = zoo.logits(model, held_out), zoo.logits(other, held_out)
    if norm == "l2":
        return float(np.linalg.norm(got - reference) / np.linalg.norm(reference))
    return float(np.abs(got - reference).max() / np.abs(reference).max())


@pytest.mark.parametrize("family", zoo.pytest_params())
def test_smoothing_alone_is_exact(tmp_path: Path, family: str) -> None:
    model = zoo.build(family)
    out = tmp_path / "smoothed.onnx"
    report = sqonnx.quantize(model, out, QuantizeConfig(smooth_only=True, exclude=(),
                                                        calibration=_calibration(model, tmp_path)))
    by_kind: dict[str, int] = {}
    for layer in report.smoothed_layers:
        by_kind[layer.smoothing] = by_kind.get(layer.smoothing, 0) + 1
    assert by_kind == EXPECTED_SMOOTHED[family], [(r.name, r.smoothing) for r in report.layers]
    assert report.quantized_layers == [] and report.settings["level"] == "float (--smooth-only)"
    assert _relative_error(model, out) < 1e-4


@pytest.mark.parametrize("family", zoo.pytest_params())
def test_every_linear_layer_found_and_on_an_integer_kernel(tmp_path: Path, family: str) -> None:
    model = zoo.build(family)
    out = tmp_path / "q.onnx"
    report = sqonnx.quantize(model, out, QuantizeConfig(alpha=0.5, exclude=(),
                                                        calibration=_calibration(model, tmp_path)))
    assert len(report.layers) == zoo.constant_weight_layers(model)
    assert len(report.quantized_layers) == len(report.layers)
    assert report.kernels is not None and not report.kernels.unfused, report.kernels.unfused
    assert report.kernels.integer_total == len(report.layers)
    assert report.kernels.dequantize_nodes == 0  # no weight dequantized at run time
    plain = tmp_path / "plain.onnx"
    sqonnx.quantize(model, plain, QuantizeConfig(smooth=False, exclude=(),
                                                 calibration=_calibration(model, tmp_path)))
    # What smoothing buys on trained-like outliers: a smaller error than plain W8A8 (or both negligible).
    smoothed, unsmoothed = _relative_error(model, out, "l2"), _relative_error(model, plain, "l2")
    assert smoothed < 0.3 and (smoothed < unsmoothed or unsmoothed < 0.01), (smoothed, unsmoothed)


def test_norms_shared_through_identity_are_smoothed(tmp_path: Path) -> None:
    """Default init: every RMSNorm weight is 1, the exporter keeps one initializer and reads it through
    Identity nodes; each norm still gets its own folded copy and the model stays exact."""
    import onnx

    from models import export_into

    target = tmp_path / "llama-default"
    target.mkdir()
    model = export_into(target, zoo.make_model("llama", trained_like=False), None, "text-generation")
    assert sum(n.op_type == "Identity" for n in onnx.load(str(model)).graph.node) >= 4
    out = tmp_path / "smoothed.onnx"
    report = sqonnx.quantize(model, out, QuantizeConfig(smooth_only=True, exclude=(),
                                                        calibration=_calibration(model, tmp_path)))
    assert sum(layer.smoothing == NORM_MUL for layer in report.smoothed_layers) == 11
    assert _relative_error(model, out) < 1e-4
