"""sqonnx on the real models, built from PyPI packages (minutes; the export extra is installed by
`make test`). Small calibration keeps the suite fast; the README's numbers use `make quality`."""

from __future__ import annotations

from pathlib import Path

import pytest

import sqonnx
from models.evaluate import eval_windows, mean_cosine, perplexity, sentence_embeddings, sentences
from sqonnx.run.inspection import inspect_model
from tests.digests import check_digest
from tests.test_inspect import assert_inspect_matches

pytestmark = pytest.mark.real_model


def _model_files(model: Path) -> list[Path]:
    """The .onnx file and the external data files beside it: what the output's bytes depend on."""
    return [model, *sorted(p for p in model.parent.iterdir() if p.suffix in (".data", ".onnx_data"))]


def test_minilm_o3_keeps_embeddings(tmp_path: Path) -> None:
    from models import minilm

    fp32 = minilm.build()
    out = tmp_path / "out" / "minilm-int8.onnx"
    config = sqonnx.QuantizeConfig(calibration=sqonnx.CalibrationConfig(num_samples=32, seq_len=128))
    report = sqonnx.quantize(fp32, out, config)
    check_digest("minilm-defaults-32x128", _model_files(fp32), out.parent)
    assert report.kernels is not None and not report.kernels.unfused
    assert report.kernels.integer_total == len(report.quantized_layers) == 36
    # BERT is post-LN: each LayerNorm output also feeds the next residual Add, so folding 1/s into
    # gamma/beta would change the residual; the default inserts an explicit Mul where calibration shows it
    # pays, and says why where it does not. The FFN output projections (GELU input) go per-token.
    query = next(layer for layer in report.layers if layer.name.endswith("layer.0/attention/self/query/MatMul"))
    assert query.smoothing == "explicit Mul" or "also read by" in query.smoothing
    ffn_out = [layer for layer in report.layers if layer.name.endswith("output/dense/MatMul")
               and "attention" not in layer.name]
    assert len(ffn_out) == 6 and all(layer.level_reason for layer in ffn_out)
    texts = sentences(fp32.parent, 32)
    cosine = mean_cosine(sentence_embeddings(out, texts), sentence_embeddings(fp32, texts))
    assert cosine >= 0.99, cosine


def test_smollm2_o3_perplexity(tmp_path: Path) -> None:
    from models import smollm2

    fp32 = smollm2.build()
    out = tmp_path / "out" / "smollm2-int8.onnx"
    config = sqonnx.QuantizeConfig(calibration=sqonnx.CalibrationConfig(num_samples=16, seq_len=512))
    report = sqonnx.quantize(fp32, out, config)
    check_digest("smollm2-defaults-16x512", _model_files(fp32), out.parent)
    # inspect smooths as quantize does: the same α, s and unsmoothed groups per layer
    assert_inspect_matches(report, inspect_model(fp32, tmp_path / "report", config, top=1))
    # 210 decoder layers and the LM head (tied: its own INT8 copy, the embedding Gather keeps the float table)
    assert report.kernels is not None and report.kernels.integer_total == 211 and not report.kernels.unfused
    kinds = {layer.smoothing for layer in report.smoothed_layers}
    assert kinds == {"Mul (per-channel weight)", "MatMul (output columns through Mul)", "MatMul (value columns)"}
    # every o_proj (30 layers, 9 query heads over 3 KV heads) folds its factor into v_proj
    o_proj = [layer for layer in report.layers if layer.name.endswith("o_proj/MatMul")]
    assert len(o_proj) == 30 and all(layer.smoothing == "MatMul (value columns)" for layer in o_proj)
    # the defaults: rotated, and per-token only where massive activations make a static range fail
    assert report.settings["rotation"].startswith("rotated the residual stream (576 channels")
    levels = [layer.level for layer in report.quantized_layers]
    assert 0 < levels.count("O1") < 40 and levels.count("O3") + levels.count("O1") == 211, levels
    windows = eval_windows(fp32.parent, 512, 4)
    base = perplexity(fp32, windows)
    quantized = perplexity(out, windows)
    assert quantized < 1.2 * base, (quantized, base)


def test_minilm_o1_per_token(tmp_path: Path) -> None:
    """Per-token dynamic activations need no smoothing recipe on BERT; biased layers stay exact."""
    from models import minilm

    fp32 = minilm.build()
    out = tmp_path / "minilm-o1.onnx"
    config = sqonnx.QuantizeConfig(level=sqonnx.Level.O1, calibration=sqonnx.CalibrationConfig(num_samples=8,
                                                                                             seq_len=128))
    report = sqonnx.quantize(fp32, out, config)
    assert report.kernels is not None and report.kernels.integer_total == 36 and report.kernels.dequantize_nodes == 0
    texts = sentences(fp32.parent, 32)
    cosine = mean_cosine(sentence_embeddings(out, texts), sentence_embeddings(fp32, texts))
    assert cosine >= 0.99, cosine


def test_smollm2_o1_perplexity(tmp_path: Path) -> None:
    from models import smollm2

    fp32 = smollm2.build()
    out = tmp_path / "smollm2-o1.onnx"
    config = sqonnx.QuantizeConfig(level=sqonnx.Level.O1, calibration=sqonnx.CalibrationConfig(num_samples=8))
    report = sqonnx.quantize(fp32, out, config)
    # Every quantized layer, the LM head included, fused into MatMulIntegerToFloat (Llama has no biases); the
    # 61 float MatMuls are attention's 60 activation x activation products and the rotary embedding's
    # inv_freq x positions.
    assert report.kernels is not None and report.kernels.integer_kernels == {"MatMulIntegerToFloat": 211}
    assert report.kernels.float_linear == 61
    windows = eval_windows(fp32.parent, 512, 4)
    base = perplexity(fp32, windows)
    quantized = perplexity(out, windows)
    assert quantized < 1.1 * base, (quantized, base)
