"""Residual-stream rotation (R1) and per-head value rotation (R2): exact in FP32 on every RMSNorm decoder of the
zoo and on SmolLM2, idempotent, byte-deterministic, spreads outlier channels, refuses LayerNorm models."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from models import zoo
from sqonnx.math.rotation import block_diagonal, hadamard, orthogonal, rotate_columns, rotate_rows
from sqonnx.passes.prepare import prepare
from sqonnx.passes.rotate import ROTATED_KEY, RotatePass, RotatePassResult, RotationResult, rotate_model

RMS_DECODERS = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma3", "mixtral")
TOLERANCE = 1e-4  # max |diff| / max |logit|


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(a).max())


def _serialized(model: ir.Model) -> bytes:
    return ir.serde.serialize_model(model).SerializeToString(deterministic=True)


def _with_outputs(model: ir.Model, names: tuple[str, ...]) -> ir.Model:
    """The model with the named values added to its outputs (logits stay first)."""
    values = {v.name: v for node in model.graph for v in node.outputs}
    for name in names:
        value = values[name]
        if value.type is None:
            value.type = ir.TensorType(ir.DataType.FLOAT)
        model.graph.outputs.append(value)
    return model


def _channel_ratio(outputs: list[np.ndarray]) -> float:
    """Worst max/median of per-channel max|x| over the norm outputs (channels on the last axis)."""
    ratios = []
    for array in outputs:
        per_channel = np.abs(array.reshape(-1, array.shape[-1])).max(axis=0)
        ratios.append(float(per_channel.max() / np.median(per_channel)))
    return max(ratios)


def _run(path: Path, feeds: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    runs = [session.run(None, feed) for feed in feeds]
    return [np.concatenate([run[i] for run in runs], axis=0) for i in range(len(runs[0]))]


def test_rotation_matrices_are_orthogonal_and_seeded() -> None:
    h = hadamard(8)
    np.testing.assert_array_equal(h @ h.T, 8 * np.eye(8))
    for n, kind in ((64, "randomized Hadamard"), (576, "random orthogonal")):
        rotation = orthogonal(n, seed=3)
        assert rotation.kind == kind
        q = rotation.matrix()
        np.testing.assert_allclose(q @ q.T, np.eye(n), atol=1e-12)
        np.testing.assert_array_equal(q, orthogonal(n, seed=3).matrix())
        assert not np.array_equal(q, orthogonal(n, seed=4).matrix())


@pytest.mark.parametrize("n", [2, 8, 64, 128, 2048])
def test_fast_hadamard_equals_the_dense_product(n: int) -> None:
    """H_n as two Kronecker factors, applied to rows and columns in chunks, equals the dense float64 product
    Q^T diag(w) W and W Q (the ways a rotation touches readers and writers), for either weight layout."""
    rotation = orthogonal(n, seed=1)
    q = hadamard(n) * rotation.signs[None, :] / np.sqrt(n)  # type: ignore[attr-defined]
    np.testing.assert_allclose(rotation.matrix(), q, atol=1e-14)
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((n, 37)).astype(np.float32)
    scale = rng.uniform(0.5, 2.0, n)
    expected = (q.T @ (scale[:, None] * weight.astype(np.float64))).astype(np.float32)
    np.testing.assert_allclose(rotate_rows(weight, 0, rotation, scale), expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(rotate_rows(np.ascontiguousarray(weight.T), 1, rotation, scale), expected.T,
                               rtol=1e-6, atol=1e-6)
    writer = rng.standard_normal((37, n)).astype(np.float32)
    expected = (writer.astype(np.float64) @ q).astype(np.float32)
    np.testing.assert_allclose(rotate_columns(writer, 1, rotation), expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(rotate_columns(np.ascontiguousarray(writer.T), 0, rotation), expected.T,
                               rtol=1e-6, atol=1e-6)
    # the products that undo a rotation (judging it: rows Q^T, Q W)
    np.testing.assert_allclose(rotation.left(weight), q @ weight.astype(np.float64), rtol=1e-5, atol=1e-5)
    rows = rng.standard_normal((5, n)).astype(np.float32)
    np.testing.assert_allclose(rotation.right_transpose(rows), rows.astype(np.float64) @ q.T, rtol=1e-5, atol=1e-5)


def test_block_diagonal_rotation_equals_the_dense_matrix() -> None:
    """R2's per-head rotation (identity outside the value columns) equals the dense block-diagonal product."""
    h = orthogonal(8, seed=2).matrix()
    rotation = block_diagonal(h, count=3, size=40, offset=16)
    dense = np.eye(40)
    for head in range(3):
        start = 16 + 8 * head
        dense[start:start + 8, start:start + 8] = h
    np.testing.assert_allclose(rotation.matrix(), dense, atol=1e-14)
    rng = np.random.default_rng(3)
    weight = rng.standard_normal((40, 5))
    np.testing.assert_allclose(rotation.left_transpose(weight), dense.T @ weight, atol=1e-12)
    np.testing.assert_allclose(rotation.right(weight.T), weight.T @ dense, atol=1e-12)


@pytest.mark.parametrize("family", zoo.pytest_params(RMS_DECODERS))
def test_rotation_is_exact_idempotent_deterministic_and_spreads_outliers(family: str, tmp_path: Path) -> None:
    source = zoo.build(family)
    model = prepare(ir.load(source))
    result = rotate_model(model, seed=0, model_dir=source.parent)
    assert result.rotated, result.reason
    assert result.head_dim == 16 and len(result.heads) == 2, result.head_reason
    assert len(result.norms) == 5  # 2 per layer and the final norm
    assert ROTATED_KEY in model.metadata_props
    if family == "gemma3":  # post-norms between the writers and the residual Adds
        assert len(result.online) == 4 and not result.writers
    else:
        assert not result.online and result.writers

    # Deterministic: a second copy rotated the same way serializes to the same bytes.
    again = prepare(ir.load(source))
    rotate_model(again, seed=0, model_dir=source.parent)
    assert _serialized(again) == _serialized(model)

    # Idempotent: a second run of the pass changes nothing.
    before = _serialized(model)
    second = RotatePass(seed=0)(model)
    assert isinstance(second, RotatePassResult) and not second.modified
    assert "already rotated" in second.rotation.reason
    assert _serialized(model) == before

    # Exact in FP32, and the norm outputs (what q/k/v, gate/up and the LM head read) lose their outliers.
    rotated_path = tmp_path / "rotated.onnx"
    original_path = tmp_path / "original.onnx"
    ir.save(_with_outputs(model, result.norms), rotated_path)
    ir.save(_with_outputs(prepare(ir.load(source)), result.norms), original_path)
    feeds = zoo.feeds(source, 2, 16, seed=0)
    original = _run(original_path, feeds)
    rotated = _run(rotated_path, feeds)
    assert _relative(original[0], rotated[0]) < TOLERANCE
    before_ratio, after_ratio = _channel_ratio(original[1:]), _channel_ratio(rotated[1:])
    assert after_ratio < 0.5 * before_ratio, (before_ratio, after_ratio)


@pytest.mark.parametrize("family", zoo.pytest_params(("opt", "gpt2")))
def test_layernorm_models_are_refused_unchanged(family: str) -> None:
    model = prepare(ir.load(zoo.build(family)))
    before = _serialized(model)
    result = rotate_model(model)
    assert not result.rotated and "LayerNorm" in result.reason
    assert _serialized(model) == before


@pytest.mark.zoo
def test_stream_read_by_something_else_is_refused() -> None:
    model = prepare(ir.load(zoo.build("llama")))
    gather = next(node for node in model.graph if node.op_type == "Gather" and node.inputs[0]
                  and node.inputs[0].name == "model.embed_tokens.weight")
    model.graph.outputs.append(gather.outputs[0])
    before = _serialized(model)
    result = RotatePass()(model)
    assert isinstance(result, RotatePassResult) and not result.modified
    assert "model output" in result.rotation.reason
    assert _serialized(model) == before


@pytest.mark.zoo
def test_head_layout_disagreeing_with_the_graph_skips_r2_only(tmp_path: Path) -> None:
    source = zoo.build("llama")
    config = json.loads((source.parent / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "head_dim": 8}))
    model = prepare(ir.load(source))
    result = rotate_model(model, model_dir=tmp_path)
    assert result.rotated and not result.heads and "head_dim 8" in result.head_reason
    path = tmp_path / "rotated.onnx"
    ir.save(model, path)
    feeds = zoo.feeds(source, 1, 16, seed=1)
    assert _relative(zoo.logits(source, feeds), zoo.logits(path, feeds)) < TOLERANCE


@pytest.mark.real_model
def test_smollm2_rotated_logits_match_fp32(tmp_path: Path) -> None:
    from models import smollm2
    from models.evaluate import eval_windows
    from sqonnx.calibrators.data import feeds_for_tokens

    source = smollm2.build()
    model = prepare(ir.load(source))
    result: RotationResult = rotate_model(model, seed=0, model_dir=source.parent)
    assert result.rotated and result.kind == "random orthogonal" and result.head_dim == 64, result.summary()
    assert len(result.norms) == 61 and len(result.heads) == 30
    rotated_dir = tmp_path / "rotated"
    rotated_dir.mkdir()
    ir.save(_with_outputs(model, result.norms), rotated_dir / "model.onnx", external_data="model.onnx.data")
    inputs = list(model.graph.inputs)
    del model
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(source.parent / name, rotated_dir / name)
    original_path = tmp_path / "original.onnx"
    ir.save(_with_outputs(prepare(ir.load(source)), result.norms), original_path, external_data="original.onnx.data")
    feeds = [feeds_for_tokens(inputs, eval_windows(source.parent, 512, 1)[0])]
    original = _run(original_path, feeds)
    rotated = _run(rotated_dir / "model.onnx", feeds)
    error = _relative(original[0], rotated[0])
    before_ratio, after_ratio = _channel_ratio(original[1:]), _channel_ratio(rotated[1:])
    print(f"SmolLM2 rotated: logits error {error:.2e}, norm-output max/median {before_ratio:.1f} -> {after_ratio:.1f}")
    assert error < TOLERANCE
    assert after_ratio < before_ratio
