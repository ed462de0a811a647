"""`sqonnx compare FP QUANT`: the quality check's numbers on the user's data (perplexity, KL, top-1 agreement for
a language model; cosine for an encoder), checked against a direct computation, a model against a copy of itself
(nothing changed), speed columns, text and a with-past model's decode, JSON, and one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

import sqonnx
from models import zoo
from sqonnx import CalibrationConfig, QuantizeConfig
from tests.child import run_sqonnx
from tests.test_decode_stage import with_past  # noqa: F401  (a fixture: the zoo's Llama with past and a tokenizer)

pytestmark = pytest.mark.zoo


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    folder = tmp_path_factory.mktemp("compare")
    model = zoo.build("llama")
    npz = zoo.save_npz(model, folder / "feeds.npz", samples=6, seq=32, seed=3)
    quantized = folder / "q" / "model.onnx"
    sqonnx.quantize(model, quantized, QuantizeConfig(calibration=CalibrationConfig(data=npz)))
    return model, quantized, npz


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def test_numbers_are_the_next_token_statistics(pair: tuple[Path, Path, Path]) -> None:
    model, quantized, npz = pair
    report = sqonnx.compare(model, quantized, npz, samples=6, rounds=1, decode_tokens=0)
    assert report.language_model and report.samples == 6 and report.tokens == 6 * 31
    data = np.load(npz)
    nll = {0: 0.0, 1: 0.0}
    kl = agree = 0.0
    for i in range(6):
        feeds = {name: data[name][i] for name in data.files}
        ids = feeds["input_ids"][0, 1:]
        logp = [_log_softmax(ort.InferenceSession(str(m), providers=["CPUExecutionProvider"]).run(
            ["logits"], feeds)[0][0, :-1]) for m in (model, quantized)]
        for k in (0, 1):
            nll[k] -= float(logp[k][np.arange(len(ids)), ids].sum())
        kl += float(np.sum(np.exp(logp[0]) * (logp[0] - logp[1])))
        agree += float(np.sum(logp[0].argmax(1) == logp[1].argmax(1)))
    tokens = 6 * 31
    assert report.perplexity_fp == pytest.approx(np.exp(nll[0] / tokens), rel=1e-6)
    assert report.perplexity == pytest.approx(np.exp(nll[1] / tokens), rel=1e-6)
    assert report.kl == pytest.approx(kl / tokens, rel=1e-5) and report.kl > 0
    assert report.top1 == pytest.approx(agree / tokens) and 0.5 < report.top1 < 1
    assert report.prefill_fp_ms > 0 and report.prefill_ms > 0 and report.decode_tokens_per_s is None


def test_a_model_against_itself_changes_nothing(tmp_path: Path, pair: tuple[Path, Path, Path]) -> None:
    model, _, npz = pair
    shutil.copy(model, tmp_path / "copy.onnx")
    report = sqonnx.compare(model, tmp_path / "copy.onnx", npz, rounds=1)
    assert report.perplexity == report.perplexity_fp and report.kl == 0.0 and report.top1 == 1.0
    assert report.cosine == pytest.approx(1.0, abs=1e-12)


def test_cli_table_and_json(tmp_path: Path, pair: tuple[Path, Path, Path]) -> None:
    model, quantized, npz = pair
    done = run_sqonnx("compare", model, quantized, "--data", npz, "--rounds", "1")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].endswith("on feeds.npz (6 samples, 186 tokens scored)")
    assert [line.split()[0] for line in lines[1:]][1:] == ["perplexity", "KL", "top-1", "cosine", "prefill"]
    done = run_sqonnx("compare", model, quantized, "--data", npz, "--rounds", "1", "--json")
    numbers = json.loads(done.stdout)
    assert numbers["tokens"] == 186 and numbers["perplexity_change"] == pytest.approx(
        numbers["perplexity"] / numbers["perplexity_fp"] - 1)
    assert numbers["prefill_speedup"] > 0


def test_text_data_and_decode_with_a_cache(tmp_path: Path, with_past: Path) -> None:  # noqa: F811
    """A with-past model on text (its tokenizer beside it): prefill, then greedy decode through the cache."""
    model = with_past
    quantized = tmp_path / "q" / "model.onnx"
    sqonnx.quantize(model, quantized, QuantizeConfig(calibration=CalibrationConfig(num_samples=4, seq_len=32,
                                                                                   decode_steps=0)))
    report = sqonnx.compare(model, quantized, samples=2, seq_len=32, rounds=1, decode_tokens=4)
    assert report.data == "held-out pydoc" and report.tokens == 2 * 31
    assert report.decode_fp_tokens_per_s and report.decode_tokens_per_s


def test_encoder_gets_cosine(tmp_path: Path) -> None:
    model = zoo.build("bert")
    npz = zoo.save_npz(model, tmp_path / "f.npz", samples=4, seq=16, seed=0)
    sqonnx.quantize(model, tmp_path / "q.onnx", QuantizeConfig(calibration=CalibrationConfig(data=npz)))
    report = sqonnx.compare(model, tmp_path / "q.onnx", npz, rounds=1)
    assert not report.language_model and report.perplexity is None and report.kl is None
    assert 0.9 < report.cosine < 1.0
    assert "perplexity" not in report.table()


@pytest.mark.parametrize(("case", "message"), [
    ("other inputs", "the models differ in inputs"),
    ("same file", "both models are"),
    ("missing", "model file not found"),
])
def test_mistakes_are_one_line(tmp_path: Path, pair: tuple[Path, Path, Path], case: str, message: str) -> None:
    model, quantized, npz = pair
    other = {"other inputs": zoo.build("bert"), "same file": model, "missing": tmp_path / "nothing.onnx"}[case]
    done = run_sqonnx("compare", model, other, "--data", npz)
    assert done.returncode == 2 and done.stderr.startswith(f"error: {message}"), done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_block_by_block_gives_the_whole_models_numbers(pair: tuple[Path, Path, Path]) -> None:
    """A pair too big for memory runs block by block: the quantized graph cut where the FP graph is (the same value
    names), FP block then quantized block per sample; the quality numbers are those of the whole models."""
    model, quantized, npz = pair
    whole = sqonnx.compare(model, quantized, npz, rounds=1, decode_tokens=0, block_bytes=0)
    blocks = sqonnx.compare(model, quantized, npz, rounds=1, block_bytes=1 << 16)  # a few blocks of the zoo's Llama
    assert whole.blocks == 1 and blocks.blocks >= 3
    for field in ("perplexity_fp", "perplexity", "kl", "top1", "cosine"):
        assert getattr(blocks, field) == pytest.approx(getattr(whole, field), rel=1e-5, abs=1e-9), field
    assert blocks.prefill_ms > 0 and blocks.decode_tokens_per_s is None
