"""Every family of the zoo: each linear layer found, every quantized one on an integer kernel in
onnxruntime's optimized graph, the smoothed layers per absorber kind, and smoothing alone exact.

The expected counts are per family (2 layers each); the LM head, tied or not, reads the final norm and is
smoothed through it in the smoothing-only run (a tied head reads Transpose(embedding): it gets a constant
of its own, passes/transposed.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import sqonnx
from models import zoo
from sqonnx import CalibrationConfig, QuantizeConfig

NORM_MUL, LN = "Mul (per-channel weight)", "LayerNormalization"
VALUE, GATED = "MatMul (value columns)", "MatMul (output columns through Mul)"
LLAMA_LIKE = {NORM_MUL: 11, VALUE: 2, GATED: 2}  # q/k/v + gate/up per layer and the LM head; o_proj; down
EXPECTED_SMOOTHED: dict[str, dict[str, int]] = {
    "llama": LLAMA_LIKE, "mistral": LLAMA_LIKE, "qwen2": LLAMA_LIKE, "qwen3": LLAMA_LIKE, "gemma3": LLAMA_LIKE,
    "phi3": {NORM_MUL: 5, VALUE: 2, GATED: 2},  # fused qkv_proj and gate_up_proj
    "mixtral": {NORM_MUL: 25, VALUE: 2, GATED: 8},  # router + 4 experts' w1/w3 share the norm; w2 via w3
    "opt": {LN: 9, VALUE: 2, "Gemm (output columns through Relu)": 2},
    "bloom": {LN: 5, VALUE: 2}, "gpt2": {LN: 4, "Gemm (value columns)": 2}, "phi": {LN: 9, VALUE: 2},
    "falcon": {LN: 5, VALUE: 2}, "falcon_old": {LN: 5, VALUE: 2}, "gpt_neox": {LN: 5, VALUE: 2},
    "bert": {VALUE: 2}, "roberta": {VALUE: 2},  # post-LN: the norms also feed residual Adds
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
    # every run checks what it wrote: perplexity for the decoders (logits), cosine for the encoders
    check = report.check
    assert check is not None and check.samples == 4 and not check.held_out  # 4 samples: all calibrate
    assert check.language_model is (family not in ("bert", "roberta")) and check.baseline_loss is not None
    assert not check.below_floor
    plain = tmp_path / "plain.onnx"
    sqonnx.quantize(model, plain, QuantizeConfig(smooth=False, exclude=(),
                                                 calibration=_calibration(model, tmp_path)))
    # What smoothing buys on trained-like outliers: a smaller error than plain W8A8 (or both negligible).
    smoothed, unsmoothed = _relative_error(model, out, "l2"), _relative_error(model, plain, "l2")
    assert smoothed < 0.3 and (smoothed < unsmoothed or unsmoothed < 0.01), (smoothed, unsmoothed)


@pytest.mark.parametrize("block_bytes", [256 << 20, 1], ids=["whole", "blocks"])
def test_norms_shared_through_identity_are_smoothed(tmp_path: Path, block_bytes: int) -> None:
    """Default init: every RMSNorm weight is 1, the exporter keeps one initializer and reads it through
    Identity nodes; each norm still gets its own folded copy and the model stays exact, also when the norms
    are in different blocks (a block sees only its own readers of the shared weight: it must still copy it)."""
    import onnx

    from models import export_into

    target = tmp_path / "llama-default"
    target.mkdir()
    model = export_into(target, zoo.make_model("llama", trained_like=False), None, "text-generation")
    assert sum(n.op_type == "Identity" for n in onnx.load(str(model)).graph.node) >= 4
    out = tmp_path / "smoothed.onnx"
    report = sqonnx.quantize(model, out, QuantizeConfig(smooth_only=True, exclude=(), block_bytes=block_bytes,
                                                        calibration=_calibration(model, tmp_path)))
    assert sum(layer.smoothing == NORM_MUL for layer in report.smoothed_layers) == 11
    assert _relative_error(model, out) < 1e-4


@pytest.mark.parametrize("family", zoo.pytest_params(["gemma3", "llama", "opt"]))
def test_alpha_auto_never_loses_to_a_single_alpha(tmp_path: Path, family: str) -> None:
    """--alpha auto keeps its per-group choice only where it beats every single α it tries on the whole
    model (on a Gemma-3-style model the per-group search alone ended at 0.286 against 0.215 at α 0.5),
    judged on the last quarter of the calibration samples, which the statistics do not see. Each single α
    quantized on its own from the first three quarters must do no better there."""
    model = zoo.build(family)
    samples = zoo.feeds(model, 32, 32, seed=0)
    np.savez(tmp_path / "all.npz", **{k: np.stack([f[k] for f in samples]) for k in samples[0]})
    np.savez(tmp_path / "first.npz", **{k: np.stack([f[k] for f in samples[:24]]) for k in samples[0]})
    held_out = samples[24:]
    reference = zoo.logits(model, held_out)
    errors = {}
    for alpha, data in (("auto", "all.npz"), (0.25, "first.npz"), (0.5, "first.npz"), (0.75, "first.npz")):
        out = tmp_path / f"{alpha}.onnx"
        # no quality check: it would keep 4 of the single α runs' 24 samples back (--alpha auto keeps its 8 anyway)
        report = sqonnx.quantize(model, out, QuantizeConfig(alpha=alpha, check_samples=0, calibration=CalibrationConfig(
            data=tmp_path / data, num_samples=32)))
        errors[alpha] = float(np.linalg.norm(zoo.logits(out, held_out) - reference) / np.linalg.norm(reference))
        if alpha == "auto":  # the report names the candidates and the one kept
            assert "chose" in report.settings["alpha"] and "per group" in report.settings["alpha"]
    assert errors["auto"] <= min(v for k, v in errors.items() if k != "auto") * (1 + 1e-6), errors


def test_level_auto_puts_massive_activations_per_token(tmp_path: Path) -> None:
    """--level auto: layers whose activation has a few huge tokens get per-token O1 (integer ops), the
    rest stay O3; every layer runs on an integer kernel and the error drops."""
    import onnx

    model = zoo.build("llama")
    held = zoo.feeds(model, 4, 32, seed=3)
    for feed in held:  # massive first-token activations are what a static range cannot hold
        feed["input_ids"][0, 0] = 3
    calibration = _calibration(model, tmp_path)
    outputs = {}
    for auto in (False, True):
        out = tmp_path / f"{auto}.onnx"
        report = sqonnx.quantize(model, out, QuantizeConfig(per_token_where_needed=auto, calibration=calibration))
        outputs[auto] = report
        assert report.kernels is not None and not report.kernels.unfused
        assert report.kernels.integer_total == len(report.quantized_layers)
    levels = {layer.level for layer in outputs[True].quantized_layers}
    assert levels <= {"O1", "O3"} and all(layer.level_reason for layer in outputs[True].quantized_layers)
    metadata = {p.key: p.value for p in onnx.load(str(tmp_path / "True.onnx"), load_external_data=False)
                .metadata_props}
    assert metadata["sqonnx.level"].startswith("auto")
    o1 = [layer.name for layer in outputs[True].quantized_layers if layer.level == "O1"]
    assert set(o1) == set(__import__("json").loads(metadata["sqonnx.level_per_layer"]))
    assert _relative_error(model, tmp_path / "True.onnx", "l2") <= _relative_error(model, tmp_path / "False.onnx",
                                                                                    "l2") * 1.02
