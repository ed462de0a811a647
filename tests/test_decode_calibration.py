"""Decode-shaped calibration of a decoder with a key/value cache: after the prefill windows, a few prompts
continue one token at a time on the cache the previous run returned, in both with-past forms (an optimum
text-generation-with-past export with position_ids, and onnxruntime-genai's GroupQueryAttention form)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

import sqonnx
from models import zoo
from sqonnx import CalibrationConfig, QuantizeConfig
from sqonnx.calibrators import channel_max
from sqonnx.calibrators.data import cache_dims, calibration_feeds, decode_chains, feeds_for_tokens
from sqonnx.graph.layers import find_linear_layers
from sqonnx.runtime.session import Session
from tests.calibrate import statistics, teacher_forced
from tests.test_cli import sqonnx as run_cli
from tests.test_genai import SEQ, build_genai, generate


def _with_past_llama() -> Path:
    """The zoo's Llama exported with past (inputs position_ids and past_key_values.N.*), cached beside the zoo."""
    target = zoo.cache_root() / f"llama-with-past-{zoo.spec_hash('llama')}"
    if (target / "model.onnx").exists():
        return target / "model.onnx"
    from models import export_into

    target.parent.mkdir(parents=True, exist_ok=True)
    return export_into(target, zoo.make_model("llama"), None, "text-generation-with-past")


def _model(form: str, tmp_path: Path) -> Path:
    return _with_past_llama() if form == "optimum" else build_genai(tmp_path / "genai")


FORMS = [pytest.param("optimum", marks=pytest.mark.zoo), "genai"]


def _activations(model: ir.Model) -> dict[str, int]:
    """Every linear layer's input and its channel count: per-token activations, the same in prefill and decode."""
    return {str(layer.activation.name): layer.weight.shape[layer.in_axis] for layer in find_linear_layers(model.graph)}


def _windows(count: int, length: int) -> np.ndarray:
    return np.random.default_rng(1).integers(3, 256, (count, length)).astype(np.int64)


def _inputs(model: ir.Model) -> list[ir.Value]:
    return [v for v in model.graph.inputs if not v.is_initializer()]


@pytest.mark.parametrize("form", FORMS)
def test_teacher_forced_decode_equals_prefill(tmp_path: Path, form: str) -> None:
    """Fed the window's own next tokens, the decode chains see exactly the per-token activations of a
    prefill of the whole windows: caches, positions and masks are fed right."""
    path = _model(form, tmp_path)
    model = ir.load(path)
    windows = _windows(3, 20)
    dims = cache_dims(path.parent)
    chains = decode_chains(_inputs(model), list(model.graph.outputs), windows, 30, dims, teacher_forced=True)
    # 3 windows, a quarter held back: the first 3 - 0 = 3; each chain a 10-token prompt and 10 single tokens.
    assert [chain.steps for chain in chains] == [10, 10, 10]
    activations = _activations(model)
    assert len(activations) >= 3  # genai: qkv, o_proj (reads the cache), lm_head
    decoded = statistics(model, [], chains, activations=activations).channel_max
    prefill = statistics(model, [feeds_for_tokens(_inputs(model), w, dims) for w in windows],
                         activations=activations).channel_max
    assert decoded.keys() == prefill.keys() == activations.keys()
    for name in activations:
        np.testing.assert_allclose(decoded[name], prefill[name], rtol=1e-4, atol=1e-6, err_msg=name)


def test_decode_feeds_the_models_greedy_tokens(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each single token is the argmax of the FP model's run before (generated first, then teacher-forced),
    through a growing cache and mask; every one of them is a run that adds to the maxima."""
    path = build_genai(tmp_path / "genai")
    model = ir.load(path)
    feeds = calibration_feeds(model.graph, path.parent, CalibrationConfig(num_samples=8, seq_len=SEQ, decode_steps=10))
    assert [chain.steps for chain in feeds.decode] == [3, 3, 2, 2]
    assert feeds.description == f"built-in pydoc topics, 8 x {SEQ} tokens + 10 decode steps"
    chains = teacher_forced(model, feeds.decode, tmp_path)
    runs: list[dict[str, np.ndarray]] = []
    real_run = Session.run

    def counted(session, fetch, feed, where):  # noqa: ANN001, ANN202
        runs.append(feed)
        return real_run(session, fetch, feed, where)

    monkeypatch.setattr(Session, "run", counted)
    activations = _activations(model)
    decoded = statistics(model, [], chains, activations=activations).channel_max
    prompt = SEQ // 2
    assert [run["input_ids"].shape[1] for run in runs] == [prompt, 1, 1, 1, prompt, 1, 1, 1, prompt, 1, 1, prompt, 1, 1]
    singles = [run for run in runs if run["input_ids"].shape[1] == 1]
    assert len(singles) == 10
    assert [run["attention_mask"].shape[1] for run in singles[:3]] == [prompt + 1, prompt + 2, prompt + 3]
    assert [run["past_key_values.0.key"].shape[2] for run in singles[:3]] == [prompt, prompt + 1, prompt + 2]
    # The tokens fed are the ones a greedy generation writes after the same prompt.
    logits = generate(path, feeds.decode[0].prompt["input_ids"][0], steps=2)
    assert [int(run["input_ids"][0, 0]) for run in singles[:3]] == [int(step[-1].argmax()) for step in logits]
    # Free-running tokens reach activations the prompts alone do not.
    runs.clear()
    prompts_only = statistics(model, [chain.prompt for chain in feeds.decode], activations=activations).channel_max
    assert len(runs) == 4
    assert any(np.any(decoded[name] > prompts_only[name] * (1 + 1e-3)) for name in activations)


def test_decode_steps_zero_is_prefill_only(tmp_path: Path) -> None:
    path = build_genai(tmp_path / "genai")
    graph = ir.load(path).graph
    before = calibration_feeds(graph, path.parent, CalibrationConfig(num_samples=8, seq_len=SEQ, decode_steps=0))
    assert before.decode == [] and before.description == f"built-in pydoc topics, 8 x {SEQ} tokens"
    # The default: 64 steps in 6 chains, none longer than a window's second half.
    default = calibration_feeds(graph, path.parent, CalibrationConfig(num_samples=8, seq_len=SEQ))
    assert [chain.steps for chain in default.decode] == [11, 11, 11, 11, 10, 10]
    assert default.description.endswith(" + 64 decode steps")


def test_quantize_calibrates_decode_steps_with_alpha_auto(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole pipeline, with --alpha auto's held-out samples: the statistics see the samples but the
    held-out ones, then the decode chains (prompts and single tokens)."""
    path = build_genai(tmp_path / "genai")
    lengths: list[int] = []
    real_run = channel_max.StatisticsSession.run

    def counted(session, feed, **kwargs):  # noqa: ANN001, ANN202
        lengths.append(feed["input_ids"].shape[1])
        return real_run(session, feed, **kwargs)

    monkeypatch.setattr(channel_max.StatisticsSession, "run", counted)
    config = QuantizeConfig(alpha="auto", calibration=CalibrationConfig(num_samples=8, seq_len=SEQ, decode_steps=8))
    (tmp_path / "out").mkdir()
    report = sqonnx.quantize(path, tmp_path / "out" / "model.onnx", config)
    assert report.calibration == f"built-in pydoc topics, 8 x {SEQ} tokens + 8 decode steps"  # int8: pydoc alone
    assert "per group" in str(report.settings["alpha"])
    # 8 samples less 2 held out, then 4 chains of a prompt and 2 single tokens (teacher-forced with the tokens
    # the FP model generated first).
    assert lengths == [SEQ] * 6 + [SEQ // 2, 1, 1] * 4


def test_negative_decode_steps_is_one_line(tmp_path: Path) -> None:
    path = build_genai(tmp_path / "genai")
    result = run_cli("quantize", path, "-o", tmp_path / "q.onnx", "--decode-steps", "-1")
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stderr.strip().splitlines() == ["error: --decode-steps must be at least 0 (0: prefill only), got -1"]
