"""`sqonnx inspect`: the outlier report (HTML + PNG + JSON) on the synthetic block with planted outliers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import sqonnx
from tests.child import run_sqonnx
from tests.synthetic import OUTLIERS


def test_inspect_report(tmp_path: Path, block: Path, feeds: Path) -> None:
    out = tmp_path / "report"
    result = run_sqonnx("inspect", block, "--out", out, "--calib-data", feeds, "--num-samples", "8", "--top", "2")
    assert result.returncode == 0, result.stderr
    assert "worst activation outliers: /attn/q_proj/MatMul" in result.stdout
    groups = {tuple(g["layers"]): g for g in json.loads((out / "report.json").read_text())}
    qkv = groups[("/attn/q_proj/MatMul", "/attn/k_proj/MatMul", "/attn/v_proj/MatMul")]
    assert qkv["activation_ratio_before"] > 50 and qkv["activation_ratio_after"] < qkv["activation_ratio_before"] / 10
    assert qkv["alpha"] is not None and qkv["absorber"].endswith("(Mul (per-channel weight))")
    for layer in qkv["layers"]:  # smoothing makes each layer less sensitive to quantization
        assert qkv["sensitivity"][layer] < qkv["sensitivity_unsmoothed"][layer] / 5
    top = qkv["top_channels"]  # the planted outliers, largest first, as the plot annotates them
    assert {top[0]["channel"], top[1]["channel"]} == set(OUTLIERS)
    assert [t["activation_before"] for t in top] == sorted((t["activation_before"] for t in top), reverse=True)
    o_proj = groups[("/attn/o_proj/MatMul",)]
    # as quantize decides it (--unabsorbed auto): nothing absorbs o_proj's 1/s, and an explicit Mul pays here
    assert o_proj["absorber"] == "/attn/o_proj/MatMul/SmoothMul (explicit Mul)"
    plots = sorted(p.name for p in out.glob("*.png"))
    assert plots == ["group_00.png", "group_01.png"]
    assert all((out / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in plots)
    page = (out / "index.html").read_text(encoding="utf-8")
    assert all(f'src="{p}"' in page for p in plots) and "/mlp/down_proj/MatMul" in page


def test_inspect_bad_model(tmp_path: Path) -> None:
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    result = run_sqonnx("inspect", junk, "--out", tmp_path / "r", timeout=120)
    assert result.returncode == 2 and result.stderr.startswith("error: ") and "Traceback" not in result.stderr
    assert not (tmp_path / "r").exists()


def test_plot_shows_every_channel() -> None:
    """SmolLM2's layer-11 down_proj case: 1536 channels, one at ~3000 against a median of ~2. The largest
    channel is drawn (pixels at 90 % of its height are coloured), annotated with its index and value, and
    every panel puts a channel at the same x, so before and after line up."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sqonnx.run.inspection import GroupInspection, draw_group, top_channels

    rng = np.random.default_rng(0)
    act = np.abs(rng.normal(2.0, 0.5, 1536)).astype(np.float32)
    act[1387], act[200] = 3000.0, 500.0
    weight = np.abs(rng.normal(0.1, 0.02, 1536)).astype(np.float32)
    scales = np.sqrt(act / weight) / 30
    assert top_channels(act, 2) == [1387, 200] == [int(np.argmax(act)), 200]
    result = GroupInspection("x", ["down_proj"], "up_proj", 0.5, 1.0, 2.0, 0, 0, 0, 0, {}, {})
    figure = draw_group(plt, act, scales, weight, result)
    figure.set_dpi(90)
    figure.canvas.draw()
    pixels = np.asarray(figure.canvas.buffer_rgba())[..., :3].astype(int)
    height = pixels.shape[0]
    axes = figure.axes
    x, y = axes[0].transData.transform((1387, 0.9 * 3000))
    column = pixels[int(round(height - y)) - 1:int(round(height - y)) + 2, int(x) - 1:int(x) + 2]
    assert (column.sum(axis=-1) < 3 * 230).any(), "the largest channel is not drawn"
    texts = [t.get_text() for t in axes[0].texts]
    assert texts[0] == "#1387  3000" and texts[1] == "#200  500"
    xs = {round(float(axis.transData.transform((1387, 0))[0]), 3) for axis in axes}
    assert len(xs) == 1, "channel 1387 is not at the same x in every panel"
    plt.close(figure)


@pytest.mark.parametrize(("family", "alpha"), [
    pytest.param(family, alpha, id=f"{family}-{alpha}", marks=pytest.mark.zoo)
    for family, alpha in (("llama", 0.5), ("llama", "auto"), ("gemma3", 0.5), ("opt", 0.5), ("bert", 0.5),
                          ("mixtral", 0.5))])
def test_inspect_describes_the_graph_quantize_smooths(tmp_path: Path, family: str, alpha: float | str) -> None:
    """inspect goes through quantize's front end and smoothing: the residual stream rotated as quantize rotates it,
    the same activations (outlier ratios per group equal to the quantize report's), one block at a time, and the
    same smoothing: per layer the same α, the same range of s, the same groups left unsmoothed and why."""
    from models import zoo
    from sqonnx import CalibrationConfig, QuantizeConfig
    from sqonnx.run.inspection import inspect_model

    model = zoo.build(family)
    config = QuantizeConfig(alpha=alpha, block_bytes=1, calibration=CalibrationConfig(
        data=zoo.save_npz(model, tmp_path / "c.npz", samples=4, seq=32, seed=0), num_samples=4))
    report = sqonnx.quantize(model, tmp_path / "q.onnx", config)
    results = inspect_model(model, tmp_path / "report", config, top=2)
    assert_inspect_matches(report, results)
    if family in ("llama", "mixtral"):  # RMSNorm decoders without post-norms: rotated by default
        assert report.settings["rotation"].startswith("rotated the residual stream")
        assert "rotated the residual stream" in (tmp_path / "report" / "index.html").read_text(encoding="utf-8")


def assert_inspect_matches(report: sqonnx.QuantizeReport, results: list) -> None:  # noqa: ANN001
    """Every layer of every inspected group has the quantize report's outlier ratio, α, range of s and reason."""
    quantized = {layer.name: layer for layer in report.layers}
    inspected = {layer: r for r in results for layer in r.layers}
    assert inspected.keys() == {name for name, layer in quantized.items()
                                if any(other.quantized for other in report.layers
                                       if other.activation == layer.activation)}
    for name, group in inspected.items():
        layer = quantized[name]
        assert group.activation_ratio_before == pytest.approx(layer.outlier_ratio_before, rel=1e-4), name
        assert group.alpha == layer.alpha, name
        if layer.scale_min is None:
            assert group.absorber == layer.smoothing and group.absorber.startswith("not smoothed"), name
        else:
            assert group.absorber == f"{layer.folded_into} ({layer.smoothing})", name
        assert (group.scale_min, group.scale_max) == (layer.scale_min, layer.scale_max), name
