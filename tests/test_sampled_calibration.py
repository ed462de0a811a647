"""Quality off the calibration domain (issue 27): the model's own text in the default calibration, several
--calib-data sources mixed, and the quality check's second set (--eval-data, else the model's own text from other
seed words), whose worse number the floor and the warnings go by."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import sqonnx
from models.evaluate import greedy_tokens
from sqonnx import CalibrationConfig, QuantizeConfig, Weights
from sqonnx.calibrators.data import calibration_feeds, load_tokenizer, pydoc_text
from sqonnx.config import OWN_TEXT_SHARE
from sqonnx.errors import SqonnxError
from sqonnx.judgements.quality import QualityCheck
from sqonnx.streaming.blocks import partition
from sqonnx.streaming.generate import sample, sample_text
from tests.test_cli import sqonnx as run_cli
from tests.test_genai import SEQ, build_genai

WHOLE = 1 << 62


def test_sample_draws_from_the_softmax() -> None:
    """Token frequencies follow softmax(logits / T); a temperature near 0 is the argmax; a seed repeats its draws."""
    logits = np.tile(np.log(np.array([[0.5, 0.3, 0.2]], np.float32)), (40_000, 1))
    drawn = sample(logits, 1.0, np.random.default_rng(0))
    np.testing.assert_allclose(np.bincount(drawn, minlength=3) / len(drawn), [0.5, 0.3, 0.2], atol=0.01)
    cooler = sample(logits, 0.5, np.random.default_rng(0))  # p^2, renormalized: 0.66, 0.24, 0.11
    np.testing.assert_allclose(np.bincount(cooler, minlength=3) / len(cooler), [25, 9, 4] / np.float64(38),
                               atol=0.01)
    assert np.all(sample(logits[:100], 1e-6, np.random.default_rng(0)) == 0)
    assert np.array_equal(drawn, sample(logits, 1.0, np.random.default_rng(0)))


def _model(tmp_path: Path) -> tuple[Path, ir.Model]:
    path = build_genai(tmp_path / "genai")
    return path, ir.load(path)


def test_default_mix_plans_the_models_own_text(tmp_path: Path) -> None:
    """A decoder that can write (a cache, logits, a tokenizer): every (1 / own_text)-th window is its own text,
    and `check` windows of text from other seed words follow as the check's second set."""
    path, model = _model(tmp_path)
    feeds = calibration_feeds(model.graph, path.parent, CalibrationConfig(num_samples=8, seq_len=SEQ,
                                                                         own_text=OWN_TEXT_SHARE), check=2,
                              can_sample=True)
    every = round(1 / OWN_TEXT_SHARE)
    sampled = [i for i in range(8) if (i + 1) % every == 0]
    assert feeds.sampling is not None and feeds.sampling.rows == [*sampled, 8, 9]
    assert feeds.count == 10 and feeds.other == 2
    assert len(feeds.sampling.prompts) == len(sampled) + 2  # windows of SEQ < SAMPLED_LENGTH tokens: one sequence each
    assert f"the model's own text ({len(sampled)} of 8 windows" in feeds.description
    assert feeds.other_description == "the model's own text from other words"
    # not asked to write (a model over GENERATE_IN_MEMORY_BYTES): neither
    plain = calibration_feeds(model.graph, path.parent, CalibrationConfig(num_samples=8, seq_len=SEQ), check=2)
    assert plain.sampling is None and plain.other == 0 and plain.count == 8
    # --calib-data: the user's text alone calibrates; the check's second set is still the model's own text
    given = calibration_feeds(model.graph, path.parent, CalibrationConfig(data=_text(tmp_path), num_samples=8,
                                                                         seq_len=SEQ), check=2, can_sample=True)
    assert given.sampling is not None and given.sampling.rows == [8, 9] and given.count == 10 and given.other == 2


def _text(tmp_path: Path, name: str = "text.txt", words: slice = slice(0, 4000)) -> Path:
    path = tmp_path / name
    path.write_text(" ".join(pydoc_text("evaluation").split()[words]))
    return path


def test_sampled_text_is_the_models_own(tmp_path: Path) -> None:
    """Near temperature 0 the sampled text is the greedy continuation a plain onnxruntime decode of the whole model
    writes (batched, block by block, the cache fed back right); at temperature 1 it is seeded: the same twice."""
    path, model = _model(tmp_path)
    feeds = calibration_feeds(model.graph, path.parent, CalibrationConfig(num_samples=8, seq_len=SEQ), check=2,
                              can_sample=True)
    assert feeds.sampling is not None
    cold = replace(feeds.sampling, temperature=1e-6)
    tokens = sample_text(model, partition(model.graph, WHOLE), cold, tmp_path / "w", keep_sessions=True)
    assert tokens.shape == (len(cold.prompts), SEQ)
    for row, prompt in zip(tokens, cold.prompts, strict=True):
        length = prompt["input_ids"].shape[1]
        assert np.array_equal(row[:length], prompt["input_ids"][0])
        assert list(row[length:]) == greedy_tokens(path, prompt["input_ids"][0], SEQ - length)[0]
    warm = sample_text(model, partition(model.graph, WHOLE), feeds.sampling, tmp_path / "w", keep_sessions=False)
    assert np.array_equal(warm, sample_text(model, partition(model.graph, WHOLE), feeds.sampling, tmp_path / "w",
                                            keep_sessions=True))
    assert not np.array_equal(warm, tokens)
    filled = feeds.with_sampled(warm)
    windows = np.stack([f["input_ids"][0] for f in filled])
    assert np.array_equal(windows[feeds.sampling.rows], warm)
    others = [i for i in range(10) if i not in feeds.sampling.rows]
    assert np.array_equal(windows[others], feeds.windows[others])  # the pydoc windows as they were


def test_quantize_checks_the_second_set(tmp_path: Path) -> None:
    """The default run measures the written model on its own text from other seed words as well, prints and records
    both; --eval-data replaces that set with the user's text."""
    path, _ = _model(tmp_path)
    config = QuantizeConfig(calibration=CalibrationConfig(num_samples=8, seq_len=SEQ, decode_steps=4),
                            check_samples=2)
    report = sqonnx.quantize(path, tmp_path / "a" / "model.onnx", config)
    check = report.check
    assert check is not None and check.other is not None
    assert check.samples == check.other.samples == 2
    assert check.other.name == "the model's own text from other words"
    assert "; on 2 samples of the model's own text from other words: perplexity" in check.summary()
    assert check.other.baseline_loss is not None  # the yardstick ran the second set too
    assert check.loss != check.other.loss
    recorded = json.loads(_metadata(tmp_path / "a" / "model.onnx")["sqonnx.quality_check"])
    assert recorded["other"]["name"] == check.other.name
    assert recorded["other"]["loss"] == pytest.approx(check.other.loss)

    own = _text(tmp_path, "prose.txt", slice(2500, 4000))
    config = QuantizeConfig(calibration=CalibrationConfig(num_samples=8, seq_len=SEQ, decode_steps=4, eval_data=own,
                                                          own_text=0.5), check_samples=2)
    report = sqonnx.quantize(path, tmp_path / "b" / "model.onnx", config)
    assert report.check is not None and report.check.other is not None and report.check.other.name == "prose.txt"
    assert "the model's own text (4 of 8 windows" in report.calibration  # --eval-data changes the check alone


def _metadata(path: Path) -> dict[str, str]:
    model = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}


def test_floor_and_warning_go_by_the_worse_set() -> None:
    good = QualityCheck(4, True, True, loss=0.03, output_error=0.1, kl=0.02, baseline_loss=0.10, baseline_error=0.2,
                        noise=0.01)
    assert not good.below_floor and not good.worse_than_baseline
    wrecked = QualityCheck(4, True, True, loss=0.8, output_error=0.6, kl=0.9, name="prose.txt")
    assert QualityCheck(**{**good.__dict__, "other": wrecked}).below_floor
    assert QualityCheck(**{**good.__dict__, "other": wrecked}).worst is wrecked
    losing = QualityCheck(4, True, True, loss=0.09, output_error=0.3, kl=0.05, baseline_loss=0.04, baseline_error=0.2,
                          noise=0.01, name="prose.txt")
    both = QualityCheck(**{**good.__dict__, "other": losing})
    assert both.worse_than_baseline and not both.below_floor


def test_calib_data_mixes_several_sources(tmp_path: Path) -> None:
    """Several files, or a folder of them: each source an equal share of the windows, taken in turn."""
    path, model = _model(tmp_path)
    tokenizer = load_tokenizer(path.parent)
    folder = tmp_path / "texts"
    folder.mkdir()
    first, second = _text(folder, "a.txt", slice(0, 2000)), _text(folder, "b.txt", slice(2000, 4000))
    by_folder = calibration_feeds(model.graph, path.parent, CalibrationConfig(data=folder, num_samples=5,
                                                                             seq_len=SEQ, decode_steps=0))
    by_files = calibration_feeds(model.graph, path.parent, CalibrationConfig(data=(first, second), num_samples=5,
                                                                            seq_len=SEQ, decode_steps=0))
    assert by_folder.description.startswith("a.txt, b.txt, 5 x")
    windows = np.stack([f["input_ids"][0] for f in by_folder])
    assert np.array_equal(windows, np.stack([f["input_ids"][0] for f in by_files]))
    ids = {name: tokenizer.encode(p.read_text(), add_special_tokens=False).ids for name, p in (("a", first),
                                                                                             ("b", second))}
    # windows 0, 2, 4 from a.txt (3 of 5), 1 and 3 from b.txt, each at its offset in its own text
    assert list(windows[0]) == ids["a"][:SEQ] and list(windows[1]) == ids["b"][:SEQ]
    assert list(windows[4]) == ids["a"][len(ids["a"]) - SEQ:] and list(windows[3]) == ids["b"][len(ids["b"]) - SEQ:]
    with pytest.raises(SqonnxError, match="mixes text files only"):
        np.savez(folder / "c.npz", input_ids=np.zeros((1, 1, 4), np.int64))
        calibration_feeds(model.graph, path.parent, CalibrationConfig(data=folder, num_samples=4, seq_len=SEQ))


def test_missing_eval_data_is_one_line(tmp_path: Path) -> None:
    path, _ = _model(tmp_path)
    result = run_cli("quantize", path, "-o", tmp_path / "q" / "model.onnx", "--eval-data", tmp_path / "none.txt")
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stderr.strip().splitlines() == [f"error: evaluation data not found: {tmp_path / 'none.txt'}"]
    assert not (tmp_path / "q").exists()


def test_missing_calib_data_with_a_cache_is_one_line(tmp_path: Path) -> None:
    """The cache's key reads the data files: they are checked before it (a traceback before)."""
    path, _ = _model(tmp_path)
    result = run_cli("quantize", path, "-o", tmp_path / "q" / "model.onnx", "--cache-dir", tmp_path / "cache",
                     "--calib-data", tmp_path / "none.txt")
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stderr.strip().splitlines() == [f"error: calibration data not found: {tmp_path / 'none.txt'}"]
    assert not (tmp_path / "q").exists() and not (tmp_path / "cache").exists()


def test_own_text_share(tmp_path: Path) -> None:
    """--own-text 0: pydoc alone, the check's second set still the model's own text; a share outside [0, 1] is one
    line."""
    path, model = _model(tmp_path)
    feeds = calibration_feeds(model.graph, path.parent, CalibrationConfig(num_samples=8, seq_len=SEQ, own_text=0),
                              check=2, can_sample=True)
    assert feeds.sampling is not None and feeds.sampling.rows == [8, 9] and "own text" not in feeds.description
    half = calibration_feeds(model.graph, path.parent, CalibrationConfig(num_samples=8, seq_len=SEQ, own_text=0.5),
                             check=2, can_sample=True)
    assert half.sampling is not None and half.sampling.rows == [1, 3, 5, 7, 8, 9]
    result = run_cli("quantize", path, "-o", tmp_path / "q" / "model.onnx", "--own-text", "2")
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stderr.strip().splitlines() == ["error: --own-text must be a share from 0 to 1, got 2; try 0.25"]


def test_second_set_from_its_own_seed(tmp_path: Path) -> None:
    """The check's own-text windows are the same whatever share of the calibration the model writes (their own seed
    and words); an .npz second set survives the sampled windows being filled; a text one beside .npz feeds is one
    line."""
    path, model = _model(tmp_path)
    part = partition(model.graph, WHOLE)
    found = []
    for share in (0.0, 0.5):
        feeds = calibration_feeds(model.graph, path.parent, CalibrationConfig(num_samples=8, seq_len=SEQ,
                                                                             own_text=share), check=2, can_sample=True)
        assert feeds.sampling is not None
        tokens = sample_text(model, part, feeds.sampling, tmp_path / "w", keep_sessions=True)
        found.append(np.stack([f["input_ids"][0] for f in feeds.with_sampled(tokens)])[-2:])
    assert np.array_equal(found[0], found[1])

    first = next(iter(calibration_feeds(model.graph, path.parent, CalibrationConfig(num_samples=8, seq_len=SEQ))))
    npz = tmp_path / "eval.npz"
    np.savez(npz, **{name: np.stack([array] * 3) for name, array in first.items()})
    feeds = calibration_feeds(model.graph, path.parent, CalibrationConfig(num_samples=8, seq_len=SEQ, eval_data=npz,
                                                                         own_text=0.5), check=2, can_sample=True)
    assert feeds.count == 10 and feeds.other == 2 and feeds.sampling is not None
    filled = feeds.with_sampled(sample_text(model, part, feeds.sampling, tmp_path / "w", keep_sessions=True))
    assert len(list(filled)) == 10
    np.savez(tmp_path / "feeds.npz", **{name: np.stack([array] * 4) for name, array in next(iter(filled)).items()})
    with pytest.raises(SqonnxError, match="is text but --calib-data is an .npz"):
        calibration_feeds(model.graph, path.parent, CalibrationConfig(data=tmp_path / "feeds.npz",
                                                                      eval_data=_text(tmp_path)), check=2)


def test_own_text_by_default_for_int4_only() -> None:
    """GPTQ's Hessians gain from the model's own text on every domain measured, INT8's ranges do not: the default
    share follows --weights; a share given is kept."""
    assert QuantizeConfig(weights=Weights.INT4).calibration.own_text == OWN_TEXT_SHARE
    assert QuantizeConfig().calibration.own_text == 0
    assert QuantizeConfig(calibration=CalibrationConfig(own_text=0.5)).calibration.own_text == 0.5
    assert QuantizeConfig(weights=Weights.INT4, calibration=CalibrationConfig(own_text=0)).calibration.own_text == 0
