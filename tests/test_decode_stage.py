"""--decode-weights int4: the prompt stage W8A8, the decode stage W4A8 MatMulNBits, one graph branching on the token
count.

The prompt stage is the W8A8 model a run without --decode-weights writes, bit for bit; the decode stage reads the
key/value cache the prompt stage wrote, so both fold the same smoothing (and rotation): a decode stage smoothed
otherwise reads a cache scaled for other columns, and its error against FP32 doubles (the control below)."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

import sqonnx
from models.evaluate import staged_logits
from sqonnx import CalibrationConfig, QuantizeConfig, Weights
from sqonnx.calibrators.data import pydoc_text
from sqonnx.errors import SqonnxError
from sqonnx.io.writer import Stage
from tests.child import run_sqonnx
from tests.test_genai import build_genai

CALIBRATION = CalibrationConfig(num_samples=8, seq_len=24, decode_steps=8, own_text=0)
PROMPT, STEPS = 20, 10


@pytest.fixture(scope="module")
def with_past(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The zoo's Llama exported with past, with a word-level tokenizer for text calibration."""
    from tests.test_decode_calibration import _with_past_llama

    folder = tmp_path_factory.mktemp("with-past")
    source = _with_past_llama()
    shutil.copy(source.parent / "config.json", folder / "config.json")
    # with its weights in a data file, as real exports are: the outputs then keep theirs in one, the branches' too
    onnx.save(onnx.load(str(source)), str(folder / "model.onnx"), save_as_external_data=True,
              location="model.onnx.data", size_threshold=0)
    words = sorted(set(pydoc_text("calibration").split()))[:250]  # ids within the zoo's 256-token vocabulary
    tokenizer = Tokenizer(models.WordLevel({"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder / "model.onnx"


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _ops(graph: onnx.GraphProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


@pytest.mark.zoo
def test_one_graph_prompt_stage_exact_decode_stage_reads_its_cache(with_past: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    config = QuantizeConfig(calibration=CALIBRATION, allow_lossy=True)
    alone, w4a8 = tmp_path / "w8a8" / "model.onnx", tmp_path / "w4a8" / "model.onnx"
    sqonnx.quantize(with_past, alone, config)
    sqonnx.quantize(with_past, w4a8, replace(config, weights=Weights.INT4))
    split = tmp_path / "split" / "model.onnx"
    report = sqonnx.quantize(with_past, split, replace(config, decode_weights=Weights.INT4))

    proto = onnx.load(str(split), load_external_data=False)
    assert [n.op_type for n in proto.graph.node] == ["Shape", "Gather", "Greater", "If"]
    assert [p.name for p in split.parent.iterdir() if p.name.endswith(".data")]  # one data file, both branches'
    assert len(list(split.parent.iterdir())) == 2
    branches = {a.name: a.g for a in proto.graph.node[-1].attribute}
    prompt_ops, decode_ops = _ops(branches["then_branch"]), _ops(branches["else_branch"])
    assert "MatMulNBits" not in prompt_ops and prompt_ops["QuantizeLinear"] >= 1
    assert decode_ops["MatMulNBits"] == len(report.quantized_layers) == 15
    assert "QuantizeLinear" not in decode_ops
    # what both stages read (the embedding table, the norms) is one tensor in the outer graph
    outer = {t.name for t in proto.graph.initializer}
    assert any("embed_tokens" in name for name in outer)
    for branch in branches.values():
        assert not outer & {t.name for t in branch.initializer}
    assert "15 of 15 layers W4A8" in str(report.settings["decode"])
    assert "integer kernels: 15 MatMulNBits" in str(report.settings["decode"])
    assert "sqonnx.decode" in {p.key for p in proto.metadata_props}

    tokens = np.random.default_rng(5).integers(3, 250, PROMPT + STEPS).astype(np.int64)
    fp = staged_logits(with_past, tokens, PROMPT)
    w8, w4 = staged_logits(alone, tokens, PROMPT), staged_logits(w4a8, tokens, PROMPT)
    staged = staged_logits(split, tokens, PROMPT)
    np.testing.assert_array_equal(staged[:PROMPT], w8[:PROMPT])  # the prompt stage is the W8A8 model
    # its decode steps: as close to FP32 as W4A8's own (which reads a W4A8 cache)
    decode_error, w4_error = relative_error(staged[PROMPT:], fp[PROMPT:]), relative_error(w4[PROMPT:], fp[PROMPT:])
    print(f"decode steps vs FP32: --decode-weights {decode_error:.3f}, W4A8 {w4_error:.3f}, W8A8 "
          f"{relative_error(w8[PROMPT:], fp[PROMPT:]):.3f}")
    assert decode_error < 1.1 * w4_error

    # the control: a decode stage smoothed with another α reads a cache scaled for other columns
    from sqonnx.run import pipeline

    track = pipeline.Pipeline._decode_track

    def other_alpha(self: pipeline.Pipeline, config: QuantizeConfig, stage: Stage,
                    float_layers: frozenset[str]) -> pipeline.Track:
        return track(self, replace(config, alpha=0.9), stage, float_layers)

    monkeypatch.setattr(pipeline.Pipeline, "_decode_track", other_alpha)
    mismatched = tmp_path / "mismatched" / "model.onnx"
    sqonnx.quantize(with_past, mismatched, replace(config, decode_weights=Weights.INT4))
    wrong = relative_error(staged_logits(mismatched, tokens, PROMPT)[PROMPT:], fp[PROMPT:])
    print(f"a decode stage smoothed with α 0.9: {wrong:.3f}")
    assert wrong > 1.5 * w4_error


def test_genai_graph_with_group_query_attention(tmp_path: Path) -> None:
    """onnxruntime-genai's form (GroupQueryAttention holds the cache, R2 rotates the value heads through it): the
    folder stays one genai loads (its config and tokenizer beside), and the decode stage's tokens track FP32."""
    source = build_genai(tmp_path / "genai", layers=2, fused_norms=True)
    out = tmp_path / "out" / "model.onnx"
    calibration = CalibrationConfig(num_samples=8, seq_len=24, own_text=0)
    report = sqonnx.quantize(source, out, QuantizeConfig(calibration=calibration, decode_weights=Weights.INT4,
                                                         allow_lossy=True))
    assert (out.parent / "genai_config.json").exists() and (out.parent / "tokenizer.json").exists()
    assert "W4A8" in str(report.settings["decode"])
    alone, w4a8 = tmp_path / "w8a8" / "model.onnx", tmp_path / "w4a8" / "model.onnx"
    sqonnx.quantize(source, alone, QuantizeConfig(calibration=calibration, allow_lossy=True))
    sqonnx.quantize(source, w4a8, QuantizeConfig(calibration=calibration, weights=Weights.INT4, allow_lossy=True))
    tokens = np.random.default_rng(3).integers(1, 2000, 16).astype(np.int64)
    fp, w8, w4, staged = (staged_logits(m, tokens, 8) for m in (source, alone, w4a8, out))
    np.testing.assert_array_equal(staged[:8], w8[:8])
    # (this random graph loses much at 4 bits: 1.32 for W4A8, 1.20 for the decode stage, 0.55 for W8A8)
    assert relative_error(staged[8:], fp[8:]) < 1.1 * relative_error(w4[8:], fp[8:])


@pytest.mark.parametrize(("options", "message"), [
    ({"weights": Weights.INT4}, "drop --weights int4"),
    ({"target": sqonnx.Target.TENSORRT}, "drop --decode-weights for --target tensorrt"),
    ({"smooth_only": True}, "--decode-weights has nothing to quantize"),
])
def test_decode_refuses_what_cannot_carry_it(options: dict, message: str) -> None:
    with pytest.raises(SqonnxError, match=message):
        QuantizeConfig(decode_weights=Weights.INT4, **options)


def test_decode_needs_a_cache(tmp_path: Path, block: Path, feeds: Path) -> None:
    out = tmp_path / "q.onnx"
    result = run_sqonnx("quantize", block, "-o", out, "--calib-data", feeds, "--num-samples", "4",
                        "--decode-weights", "int4")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: --decode-weights writes a decode stage")
    assert "past" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()


@pytest.mark.zoo
@pytest.mark.parametrize("options", [{"alpha": "auto"}, {"keep_float_budget": 0.0}], ids=["alpha-auto", "keep-float"])
def test_decode_stage_after_the_choices(with_past: Path, tmp_path: Path, options: dict) -> None:
    """Where the smoothing or the float layers are chosen at the end of the calibration pass, the decode stage is
    built in a pass of its own with what was chosen: the prompt stage is still the W8A8 model, the decode stage reads
    its cache."""
    config = QuantizeConfig(calibration=CALIBRATION, allow_lossy=True, **options)
    alone, w4a8 = tmp_path / "w8a8" / "model.onnx", tmp_path / "w4a8" / "model.onnx"
    sqonnx.quantize(with_past, alone, config)
    sqonnx.quantize(with_past, w4a8, replace(config, weights=Weights.INT4))
    split = tmp_path / "split" / "model.onnx"
    report = sqonnx.quantize(with_past, split, replace(config, decode_weights=Weights.INT4))
    assert "W4A8" in str(report.settings["decode"])
    tokens = np.random.default_rng(5).integers(3, 250, PROMPT + STEPS).astype(np.int64)
    fp, w8, w4, staged = (staged_logits(m, tokens, PROMPT) for m in (with_past, alone, w4a8, split))
    np.testing.assert_array_equal(staged[:PROMPT], w8[:PROMPT])
    assert relative_error(staged[PROMPT:], fp[PROMPT:]) < 1.1 * relative_error(w4[PROMPT:], fp[PROMPT:])


@pytest.mark.zoo
def test_decode_stage_in_8_bit_blocks(with_past: Path, tmp_path: Path) -> None:
    """--decode-weights int8-blocks: 8-bit MatMulNBits blocks (int8 activations per row and block in the kernel) in the
    decode stage; its steps are as close to FP32 as the W8A8 model's own."""
    config = QuantizeConfig(calibration=CALIBRATION, allow_lossy=True)
    alone, split = tmp_path / "w8a8" / "model.onnx", tmp_path / "split" / "model.onnx"
    sqonnx.quantize(with_past, alone, config)
    report = sqonnx.quantize(with_past, split, replace(config, decode_weights=Weights.INT8_BLOCKS))
    assert "15 of 15 layers W8A8 blocks (int8 MatMulNBits, blocks of 32, rounded nearest)" in report.settings["decode"]
    decode = next(a.g for a in onnx.load(str(split)).graph.node[-1].attribute if a.name == "else_branch")
    assert {a.i for n in decode.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "bits"} == {8}
    tokens = np.random.default_rng(5).integers(3, 250, PROMPT + STEPS).astype(np.int64)
    fp, w8, staged = (staged_logits(m, tokens, PROMPT) for m in (with_past, alone, split))
    np.testing.assert_array_equal(staged[:PROMPT], w8[:PROMPT])
    assert relative_error(staged[PROMPT:], fp[PROMPT:]) < 1.1 * relative_error(w8[PROMPT:], fp[PROMPT:])
