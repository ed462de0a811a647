"""The quality check every run makes (sqonnx.judgements.quality): it measures what was written, and a model far
out of line is refused."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import sqonnx
from sqonnx import CalibrationConfig, QuantizeConfig
from sqonnx.errors import SqonnxError
from sqonnx.judgements.quality import COSINE_FLOOR
from tests.child import run_sqonnx

WIDTH = 16
OUTLIER = 3  # an activation channel 10^4 times the others, read by a weight row 10^4 times smaller


def _linear_model(path: Path) -> Path:
    """y = x W with no residual path: per-tensor INT8 of x without smoothing zeroes every channel but the outlier,
    whose weight row contributes almost nothing, so the output collapses; smoothing balances the two."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((WIDTH, WIDTH)).astype(np.float32)
    w[OUTLIER] *= 1e-4
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="/proj/MatMul")], "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", WIDTH])],
        [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def _samples(count: int) -> np.ndarray:
    x = np.random.default_rng(1).standard_normal((count, 1, 8, WIDTH)).astype(np.float32)
    x[..., OUTLIER] *= 1e4
    return x


def _quantize(tmp_path: Path, samples: int, **options: object) -> tuple[sqonnx.QuantizeReport, Path, np.ndarray]:
    model = _linear_model(tmp_path / "linear.onnx")
    x = _samples(samples)
    np.savez(tmp_path / "feeds.npz", x=x)
    out = tmp_path / "out" / "q.onnx"
    config = QuantizeConfig(calibration=CalibrationConfig(data=tmp_path / "feeds.npz", num_samples=samples),
                            **options)  # type: ignore[arg-type]
    return sqonnx.quantize(model, out, config), out, x


def _mean_cosine(model: Path, reference: Path, samples: np.ndarray) -> float:
    """What the check computes: the cosine of each sample's flattened output to the FP model's, averaged."""
    fp, q = ort.InferenceSession(str(reference)), ort.InferenceSession(str(model))
    cosines = []
    for x in samples:
        a, b = fp.run(None, {"x": x})[0].ravel().astype(np.float64), q.run(None, {"x": x})[0].ravel().astype(np.float64)
        cosines.append(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))  # an all-zero output: 0
    return float(np.mean(cosines))


@pytest.mark.parametrize(("samples", "held_out"), [(8, False), (16, True)])
def test_check_measures_the_written_model(tmp_path: Path, samples: int, held_out: bool) -> None:
    report, out, x = _quantize(tmp_path, samples)
    check = report.check
    assert check is not None and check.samples == 4 and check.held_out is held_out
    assert not check.language_model  # no logits: 1 - cosine of the first output
    # the last four samples: held back from the statistics (16), or the last calibration samples (8)
    assert check.loss == pytest.approx(1 - _mean_cosine(out, tmp_path / "linear.onnx", x[-4:]), abs=1e-6)
    assert check.loss < 1e-3
    # plain W8A8 on the same samples collapses (the yardstick is measured, not assumed)
    assert check.baseline_loss is not None and check.baseline_loss > 0.5
    meta = {p.key: p.value for p in onnx.load(str(out), load_external_data=False).metadata_props}
    assert json.loads(meta["sqonnx.quality_check"]) == {
        "samples": 4, "held_out": held_out, "language_model": False, "loss": check.loss,
        "output_error": check.output_error, "baseline_loss": check.baseline_loss,
        "baseline_error": check.baseline_error, "baseline_name": "unsmoothed W8A8", "kl": 0.0}
    assert check.noise is not None and check.baseline_loss - check.loss > check.noise  # smoothing's gain is no noise
    assert "quality check on 4" in report.summary() and "unsmoothed W8A8 cosine to FP32" in report.summary()


def test_check_off(tmp_path: Path) -> None:
    report, out, _ = _quantize(tmp_path, 8, check_samples=0)
    assert report.check is None and "off (--check-samples 0)" in report.summary()
    meta = {p.key for p in onnx.load(str(out), load_external_data=False).metadata_props}
    assert "sqonnx.quality_check" not in meta


def test_floor_refuses_a_wrecked_model(tmp_path: Path) -> None:
    expected = (r"far worse than FP32: quality check on 4 .* cosine to FP32 0\.\d+ .*the floor is cosine 0\.9\); "
                r"largest outlier ratio after smoothing: /proj/MatMul \d+; try without --no-smooth --static, "
                r".*--allow-lossy")
    with pytest.raises(SqonnxError, match=expected) as caught:
        _quantize(tmp_path, 8, smooth=False, per_token_where_needed=False)
    assert "\n" not in str(caught.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["feeds.npz", "linear.onnx"]  # no output, no scratch
    report, out, x = _quantize(tmp_path, 8, smooth=False, per_token_where_needed=False, allow_lossy=True)
    assert report.check is not None and 1 - report.check.loss < COSINE_FLOOR
    assert _mean_cosine(out, tmp_path / "linear.onnx", x[-4:]) < COSINE_FLOOR  # what was refused is that bad


def test_floor_error_on_the_command_line(tmp_path: Path) -> None:
    model = _linear_model(tmp_path / "linear.onnx")
    np.savez(tmp_path / "feeds.npz", x=_samples(8))
    out = tmp_path / "q.onnx"
    command = ["quantize", str(model), "-o", str(out), "--calib-data",
               str(tmp_path / "feeds.npz"), "--no-smooth", "--static"]
    result = run_sqonnx(*command)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: the quantized model is far worse than FP32"), lines
    assert not out.exists()
    result = run_sqonnx(*command, "--allow-lossy")
    assert result.returncode == 0 and out.exists(), result.stderr
    assert "writing a model far worse than FP32 (--allow-lossy)" in result.stderr


def test_negative_check_samples_is_refused(tmp_path: Path) -> None:
    model = _linear_model(tmp_path / "linear.onnx")
    result = run_sqonnx("quantize", model, "-o", tmp_path / "q.onnx", "--check-samples", "-1")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: --check-samples must be >= 0 (0: no quality check), got -1; try 4"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["linear.onnx"]


def _gained_llama(tmp_path: Path) -> Path:
    """The zoo's llama with three residual channels kept 100x smaller (embedding columns, o_proj and down_proj
    rows) and every norm's gain 100x larger there: the readers see about the same x g, so the model is about the
    same, but rotation folds the gains into the readers' weights and spreads them over every row."""
    import torch

    from models import export_into, zoo

    channels = [9, 23, 51]
    model = zoo.make_model("llama")
    with torch.no_grad():
        model.get_input_embeddings().weight[:, channels] *= 0.01
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[channels, :] *= 0.01
            layer.mlp.down_proj.weight[channels, :] *= 0.01
            layer.input_layernorm.weight[channels] *= 100
            layer.post_attention_layernorm.weight[channels] *= 100
        model.model.norm.weight[channels] *= 100
    return export_into(tmp_path / "gained", model, None, "text-generation")


@pytest.mark.zoo
def test_rotation_kept_only_where_it_pays(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from models import zoo

    def error(path: Path) -> float:
        return float(np.linalg.norm(zoo.logits(path, held_out) - reference) / np.linalg.norm(reference))

    model = _gained_llama(tmp_path)
    calibration = CalibrationConfig(data=zoo.save_npz(model, tmp_path / "calib.npz", samples=32, seq=32, seed=0),
                                    num_samples=32)
    held_out = zoo.feeds(model, 4, 32, seed=7)
    reference = zoo.logits(model, held_out)
    default = sqonnx.quantize(model, tmp_path / "default.onnx", QuantizeConfig(calibration=calibration))
    # (4 or 5 groups: the LM head's counts where it stays INT8)
    assert re.match(r"not rotated: the rotation loses \(INT8 error on calibration rows of the [45] groups reading the "
                    r"stream", str(default.settings["rotation"])), default.settings["rotation"]
    asked = sqonnx.quantize(model, tmp_path / "rotated.onnx", QuantizeConfig(rotate=True, calibration=calibration))
    assert asked.settings["rotation"].startswith("rotated the residual stream")  # an explicit flag is honoured...
    assert "--rotate loses (INT8 error on calibration rows" in caplog.text  # ...with a warning
    # the judgement is right: the rotated model is far further from FP32 on windows neither run saw
    assert error(tmp_path / "default.onnx") < 0.1 and error(tmp_path / "rotated.onnx") > 5 * error(
        tmp_path / "default.onnx")
    # where the gains are ordinary the rotation stays, judged
    plain = sqonnx.quantize(zoo.build("llama"), tmp_path / "plain.onnx", QuantizeConfig(calibration=calibration))
    assert plain.settings["rotation"].startswith("rotated the residual stream") and \
        "groups reading the stream" in plain.settings["rotation"]


@pytest.mark.zoo
def test_int8_lm_head_kept_only_where_it_pays(tmp_path: Path) -> None:
    """Every checked run measures the model with its LM head float too, on the same samples: an ordinary head
    stays INT8; one whose input a static range cannot hold (a planted outlier channel in the final norm's gain,
    unsmoothed, --static) is written float, and the check measures what was written."""
    import torch

    from models import export_into, zoo

    calibration = CalibrationConfig(data=zoo.save_npz(zoo.build("llama"), tmp_path / "calib.npz", samples=16, seq=32,
                                                      seed=0), num_samples=16)
    plain = sqonnx.quantize(zoo.build("llama"), tmp_path / "plain.onnx", QuantizeConfig(calibration=calibration))
    assert re.fullmatch(r"INT8 \(/lm_head/MatMul; perplexity [+-]\d+\.\d\d% with it INT8, "
                        r"perplexity [+-]\d+\.\d\d% float, on the check's samples\)",
                        str(plain.settings["lm_head"])), plain.settings["lm_head"]
    assert next(layer for layer in plain.layers if layer.name == "/lm_head/MatMul").quantized

    model = zoo.make_model("llama")
    with torch.no_grad():
        model.model.norm.weight[[5, 40]] *= 300
    planted = export_into(tmp_path / "planted", model, None, "text-generation")
    # (far from FP32 even with the head float, KL about 1.5: written with --allow-lossy)
    report = sqonnx.quantize(planted, tmp_path / "planted.onnx", QuantizeConfig(
        calibration=calibration, smooth=False, per_token_where_needed=False, allow_lossy=True))
    verdict = re.fullmatch(r"float: INT8 does not pay \(/lm_head/MatMul; perplexity ([+-]\d+\.\d\d)% with it INT8, "
                           r"perplexity ([+-]\d+\.\d\d)% float, on the check's samples\)",
                           str(report.settings["lm_head"]))
    assert verdict, report.settings["lm_head"]
    int8, float_head = float(verdict[1]) / 100, float(verdict[2]) / 100
    assert int8 > 2 * float_head + 0.01
    # the check measured the model written, with the head float
    assert report.check is not None and abs(report.check.loss - float_head) < 0.0006
    head = next(layer for layer in report.layers if layer.name == "/lm_head/MatMul")
    assert not head.quantized
    graph = onnx.load(str(tmp_path / "planted.onnx"), load_external_data=False).graph
    producers = {out: node.op_type for node in graph.node for out in node.output}
    matmul = next(node for node in graph.node if node.name == "/lm_head/MatMul")
    assert not any(producers.get(name) == "DequantizeLinear" for name in matmul.input)  # float in the saved graph
    saved = {p.key: p.value for p in onnx.load(str(tmp_path / "planted.onnx"), load_external_data=False).metadata_props}
    assert saved["sqonnx.lm_head"] == report.settings["lm_head"]


def test_kl_floor_catches_what_perplexity_cannot() -> None:
    """On data the FP model does not predict (random tokens), a wrecked model's perplexity can fall below FP32's:
    the mean KL from the FP model's next-token distributions still shows it, and is exact."""
    from sqonnx.judgements.quality import KL_FLOOR, QualityCheck
    from sqonnx.streaming.runner import Comparison

    rng = np.random.default_rng(0)
    reference = rng.standard_normal((1, 9, 50)).astype(np.float32)
    output = reference + rng.standard_normal(reference.shape).astype(np.float32) * 6
    ids = rng.integers(0, 50, (1, 9))
    comparison = Comparison()
    comparison.add("logits", reference, output, {"input_ids": ids})
    p = np.exp(reference[0, :-1].astype(np.float64))
    p /= p.sum(-1, keepdims=True)
    q = np.exp(output[0, :-1].astype(np.float64))
    q /= q.sum(-1, keepdims=True)
    assert comparison.mean_kl == pytest.approx(float(np.mean(np.sum(p * np.log(p / q), axis=-1))), rel=1e-5)
    same = Comparison()
    same.add("logits", reference, reference, {"input_ids": ids})
    assert same.mean_kl == pytest.approx(0.0, abs=1e-9)
    wrecked = QualityCheck(4, True, True, loss=-0.999, output_error=0.5, kl=comparison.mean_kl)
    assert comparison.mean_kl > KL_FLOOR and wrecked.below_floor and "KL" in wrecked.summary()
    assert not QualityCheck(4, True, True, loss=0.03, output_error=0.1, kl=0.02).below_floor


def test_noise_is_measured_from_the_per_sample_spread() -> None:
    """The check's noise, on hand-made per-sample losses: the 95 % confidence half-width of the mean difference,
    Student's t(0.975, n - 1) standard errors (3.182 for 4 samples, 12.706 for 2, 2.228 from 11 on), of the
    per-sample differences where both models ran the same samples, else of both spreads; one sample has none."""
    from sqonnx.judgements.quality import loss_noise

    written, baseline = [0.010, 0.012, 0.008, 0.011], [0.009, 0.010, 0.009, 0.010]
    # differences 0.001, 0.002, -0.001, 0.001: standard deviation 0.00125831, standard error 0.00062915
    assert loss_noise(written, baseline, paired=True) == pytest.approx(3.182 * 0.00062915, rel=1e-5)
    # standard deviations 0.00170783 and 0.00057735: standard error sqrt(0.00170783^2 / 4 + 0.00057735^2 / 4)
    assert loss_noise(written, baseline, paired=False) == pytest.approx(3.182 * 0.00090139, rel=1e-5)
    assert loss_noise(written[:2], baseline[:2], paired=True) == pytest.approx(12.706 * 0.0005, rel=1e-5)
    assert loss_noise(written * 3, baseline * 3, paired=True) == pytest.approx(2.228 * 0.000328564, rel=1e-5)
    assert loss_noise(written[:1], baseline[:1], paired=True) is None


def test_warning_only_beyond_the_noise() -> None:
    """Both sides of the line, with the numbers of the zoo's FP16 Llama checked in-sample on 4 samples with
    --alpha 0.05 (test_no_warning_within_the_noise): +0.29 % perplexity over unsmoothed W8A8 within a noise of
    0.44 % is no warning (the rule before, 10 % more output error and any more loss, warned there); +3.17 % is."""
    from dataclasses import replace

    from sqonnx.judgements.quality import QualityCheck

    near = QualityCheck(4, False, True, loss=0.0012, output_error=0.0350, baseline_loss=-0.0017,
                        baseline_error=0.0292, noise=0.0044)
    assert not near.worse_than_baseline
    assert near.summary() == ("quality check on 4 calibration (in-sample) samples: perplexity 1.001x FP32 (+0.1%), "
                              "KL 0; unsmoothed W8A8 perplexity 0.998x FP32 (-0.2%) (difference +0.29%, noise 0.44%)")
    clear = replace(near, loss=0.0300)
    assert clear.worse_than_baseline and "(difference +3.17%, noise 0.44%)" in clear.summary()
    assert not replace(clear, output_error=0.0300).worse_than_baseline  # no further from the FP model's output
    unmeasured = replace(clear, noise=None)  # one sample: no spread to measure, no warning
    assert not unmeasured.worse_than_baseline
    assert unmeasured.summary().endswith("(difference +3.17%, noise not measured)")
    cosine = QualityCheck(4, True, False, loss=0.0030, output_error=0.05, baseline_loss=0.0010, baseline_error=0.04,
                          noise=0.0015)
    assert cosine.worse_than_baseline and cosine.summary().endswith("(difference +0.0020, noise 0.0015)")
    assert not replace(cosine, noise=0.0025).worse_than_baseline


def test_comparison_keeps_each_samples_loss() -> None:
    """Per sample, what the check sums: the perplexity ratio - 1 of the sample alone (its mean NLL gap per token to
    the FP model), or 1 - its cosine; from them, the check's loss (samples of one length)."""
    from sqonnx.streaming.runner import Comparison

    rng = np.random.default_rng(0)
    language, other = Comparison(), Comparison()
    expected = []
    for scale in (0.1, 0.3, 1.0):
        reference = rng.standard_normal((1, 9, 50)).astype(np.float32)
        output = reference + scale * rng.standard_normal(reference.shape).astype(np.float32)
        ids = rng.integers(0, 50, (1, 9))
        language.add("logits", reference, output, {"input_ids": ids})
        other.add("y", reference, output, {})

        def nll(logits: np.ndarray, ids: np.ndarray = ids) -> float:
            z = logits[0, :-1].astype(np.float64)
            z = z - np.log(np.exp(z).sum(-1, keepdims=True))
            return float(-z[np.arange(8), ids[0, 1:]].mean())

        expected.append(np.exp(nll(output) - nll(reference)) - 1)
    assert language.sample_losses == pytest.approx(expected, rel=1e-6)
    assert np.expm1(np.mean(np.log1p(language.sample_losses))) == pytest.approx(language.quality_loss, rel=1e-9)
    assert other.sample_losses == pytest.approx([1 - c for c in other.cosines])
    assert np.mean(other.sample_losses) == pytest.approx(other.quality_loss)


def test_check_pairs_the_samples_both_ran() -> None:
    """The written model and the baseline on the same samples: the noise of the per-sample differences; a model
    judged on other samples (--keep-float-budget's trials): of both spreads."""
    from sqonnx.judgements.quality import loss_noise
    from sqonnx.run.pipeline import Track, _check

    rng = np.random.default_rng(1)
    written = Track("requested", QuantizeConfig(), keys={4, 5, 6, 7})
    baseline = Track("unsmoothed W8A8", QuantizeConfig(smooth=False), keys={4, 5, 6, 7})
    for _ in range(4):
        reference = rng.standard_normal((1, 8, 16)).astype(np.float32)
        for track, scale in ((written, 0.1), (baseline, 0.2)):
            track.comparison.add("y", reference, reference + scale * rng.standard_normal(reference.shape), {})
    losses = written.comparison.sample_losses, baseline.comparison.sample_losses
    check = _check(written, baseline, held_out=True)
    assert check is not None and check.noise == loss_noise(*losses, paired=True)
    written.keys = {0, 1, 2, 3}
    check = _check(written, baseline, held_out=True)
    assert check is not None and check.noise == loss_noise(*losses, paired=False) != loss_noise(*losses, paired=True)


@pytest.mark.zoo
def test_no_warning_within_the_noise(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The zoo's FP16 Llama, 4 calibration samples checked in-sample, --alpha 0.05: the written model and
    unsmoothed W8A8 differ by less than the spread over those 4 samples can (here perplexity +0.1 % against
    -0.2 %, difference +0.29 %, noise 0.44 %; output error 0.035 against 0.029, which the rule before took for a
    loss), so no warning, and the summary says so."""
    from models import zoo

    calibration = CalibrationConfig(data=zoo.save_npz(zoo.build("llama"), tmp_path / "c.npz", samples=4, seq=32,
                                                      seed=1), num_samples=4)
    with caplog.at_level("WARNING"):
        report = sqonnx.quantize(zoo.build("llama", "float16"), tmp_path / "q.onnx",
                                 QuantizeConfig(alpha=0.05, calibration=calibration))
    check = report.check
    assert check is not None and check.samples == 4 and not check.held_out and check.baseline_loss is not None
    assert check.noise is not None and abs(check.loss - check.baseline_loss) < check.noise
    assert not check.worse_than_baseline and "loses more than" not in caplog.text
    assert str(report.settings["quality_check"]).endswith(f", noise {check.noise:.2%})")
