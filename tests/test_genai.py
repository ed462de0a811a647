"""onnxruntime-genai's graph form: a decoder layer as the model builder writes it (token inputs, an attention
mask reduced to seqlens_k, a KV cache whose head size is symbolic, GroupQueryAttention with RoPE), calibrated
from text with genai_config.json beside it, and o_proj smoothed into the value columns behind
GroupQueryAttention: the packed qkv projection's v part, or a separate v_proj with its bias."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper
from tokenizers import Tokenizer, models, pre_tokenizers

import sqonnx
from sqonnx import CalibrationConfig, QuantizeConfig
from sqonnx.calibrators.data import pydoc_text
from sqonnx.passes.absorbers import Site
from sqonnx.passes.absorbers.gqa import GroupQueryAttentionAbsorber
from sqonnx.passes.smoothing_groups import find_smoothing_groups

HIDDEN, HEADS, KV_HEADS, HEAD_SIZE, MAX_LEN = 64, 4, 2, 16, 64  # onnxruntime wants head sizes in 16s
OUTLIER_VALUE_CHANNELS = (3, 21)  # KV head 0 dim 3, KV head 1 dim 5
SEQ = 24
CALIBRATION = CalibrationConfig(num_samples=8, seq_len=SEQ)


def _tokenizer(folder: Path) -> int:
    words = sorted(set(pydoc_text("calibration").split()))[:2000]
    tokenizer = Tokenizer(models.WordLevel({"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(folder / "tokenizer.json"))
    return len(words) + 1


def value_channel_map() -> np.ndarray:
    """The value channel behind each attention output channel: query head h reads KV head h // 2."""
    c = np.arange(HIDDEN)
    return (c // HEAD_SIZE // (HEADS // KV_HEADS)) * HEAD_SIZE + c % HEAD_SIZE


def build_genai(folder: Path, *, packed: bool = True, attributes: dict | None = None) -> Path:
    """model.onnx + genai_config.json + tokenizer.json, as the builder writes a one-layer decoder."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = _tokenizer(folder)
    rng = np.random.default_rng(0)

    def w(*shape: int, scale: float = 0.3) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    kv = KV_HEADS * HEAD_SIZE
    wq, wk, wv, wo = w(HIDDEN, HIDDEN), w(HIDDEN, kv), w(HIDDEN, kv), w(HIDDEN, HIDDEN)
    wv[:, list(OUTLIER_VALUE_CHANNELS)] *= 60.0  # value channels with ~60x larger values
    for channel in OUTLIER_VALUE_CHANNELS:
        wo[value_channel_map() == channel] /= 60.0  # ... read by small o_proj rows, as in trained models
    angles = np.outer(np.arange(MAX_LEN), 1.0 / 10000 ** (np.arange(0, HEAD_SIZE, 2) / HEAD_SIZE))
    inits = {
        "embed": w(vocab, HIDDEN, scale=1.0), "wo": wo, "lm_head": w(HIDDEN, vocab),
        "norm.weight": (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32),
        "cos_cache": np.cos(angles).astype(np.float32), "sin_cache": np.sin(angles).astype(np.float32),
        "one": np.array([1], np.int64), "one_scalar": np.array(1, np.int64),
    }
    if packed:
        inits["wqkv"] = np.concatenate([wq, wk, wv], axis=1)
        projections = [helper.make_node("MatMul", ["h", "wqkv"], ["qkv"], name="/model/layers.0/attn/qkv_proj/MatMul")]
        qkv = ["qkv", "", ""]
    else:
        inits.update(wq=wq, wk=wk, wv=wv, v_bias=w(kv, scale=0.5))
        projections = [
            helper.make_node("MatMul", ["h", "wq"], ["q"], name="/model/layers.0/attn/q_proj/MatMul"),
            helper.make_node("MatMul", ["h", "wk"], ["k"], name="/model/layers.0/attn/k_proj/MatMul"),
            helper.make_node("MatMul", ["h", "wv"], ["v0"], name="/model/layers.0/attn/v_proj/MatMul"),
            helper.make_node("Add", ["v0", "v_bias"], ["v"], name="/model/layers.0/attn/v_proj/Add")]
        qkv = ["q", "k", "v"]
    gqa_attributes = {"num_heads": HEADS, "kv_num_heads": KV_HEADS, "do_rotary": 1, "rotary_interleaved": 0,
                      "local_window_size": -1, "scale": float(1 / np.sqrt(HEAD_SIZE)), **(attributes or {})}
    nodes = [
        helper.make_node("Gather", ["embed", "input_ids"], ["e"], name="/model/embed_tokens/Gather"),
        helper.make_node("Mul", ["e", "norm.weight"], ["h"], name="/model/layers.0/input_layernorm/Mul"),
        *projections,
        # genai's attn_mask_reformat: seqlens_k = sum(mask) - 1, total_sequence_length = mask.shape[1]
        helper.make_node("ReduceSum", ["attention_mask", "one"], ["mask_sum"], keepdims=0, name="/mask/ReduceSum"),
        helper.make_node("Sub", ["mask_sum", "one_scalar"], ["mask_len"], name="/mask/Sub"),
        helper.make_node("Cast", ["mask_len"], ["seqlens_k"], to=TensorProto.INT32, name="/mask/Sub/Cast"),
        helper.make_node("Shape", ["attention_mask"], ["mask_shape"], name="/mask/Shape"),
        helper.make_node("Gather", ["mask_shape", "one_scalar"], ["total"], axis=0, name="/mask/Gather"),
        helper.make_node("Cast", ["total"], ["total32"], to=TensorProto.INT32, name="/mask/Gather/Cast"),
        helper.make_node("GroupQueryAttention", [*qkv, "past_key_values.0.key", "past_key_values.0.value",
                                                 "seqlens_k", "total32", "cos_cache", "sin_cache"],
                         ["attn", "present.0.key", "present.0.value"], domain="com.microsoft",
                         name="/model/layers.0/attn/GroupQueryAttention", **gqa_attributes),
        helper.make_node("MatMul", ["attn", "wo"], ["o"], name="/model/layers.0/attn/o_proj/MatMul"),
        helper.make_node("Add", ["e", "o"], ["residual"], name="/model/layers.0/residual/Add"),
        helper.make_node("MatMul", ["residual", "lm_head"], ["logits"], name="/lm_head/MatMul"),
    ]
    cache = [helper.make_tensor_value_info(f"{io}.0.{kind}", TensorProto.FLOAT,
                                           ["batch_size", KV_HEADS, length, "kv_cache_dim"])
             for io, length in (("past_key_values", "past_sequence_length"), ("present", "total_sequence_length"))
             for kind in ("key", "value")]
    graph = helper.make_graph(
        nodes, "genai",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"]),
         *cache[:2]],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", "sequence_length", vocab]),
         *cache[2:]],
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                    helper.make_opsetid("com.microsoft", 1)])
    onnx.checker.check_model(model)
    onnx.save(model, folder / "model.onnx")
    (folder / "genai_config.json").write_text(json.dumps({"model": {"decoder": {
        "filename": "model.onnx", "head_size": HEAD_SIZE, "hidden_size": HIDDEN, "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS, "num_hidden_layers": 1}}}))
    return folder / "model.onnx"


def generate(model: Path, tokens: np.ndarray, steps: int = 3) -> list[np.ndarray]:
    """Logits of a prefill of `tokens`, then of `steps` decode steps fed their own present cache."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    empty = np.zeros((1, KV_HEADS, 0, HEAD_SIZE), np.float32)
    feeds = {"input_ids": tokens[None], "attention_mask": np.ones((1, len(tokens)), np.int64),
             "past_key_values.0.key": empty, "past_key_values.0.value": empty}
    logits = []
    for _ in range(steps + 1):
        out = dict(zip(names, session.run(None, feeds), strict=True))
        logits.append(out["logits"][0])
        total = feeds["attention_mask"].shape[1] + 1
        feeds = {"input_ids": out["logits"][:, -1:].argmax(-1).astype(np.int64),
                 "attention_mask": np.ones((1, total), np.int64),
                 "past_key_values.0.key": out["present.0.key"], "past_key_values.0.value": out["present.0.value"]}
    return logits


def prompt(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, 2000, 16).astype(np.int64)


def o_proj_layer(report: sqonnx.QuantizeReport):  # noqa: ANN201
    return next(layer for layer in report.layers if layer.name == "/model/layers.0/attn/o_proj/MatMul")


@pytest.mark.parametrize("packed", [True, False])
def test_absorber_finds_the_value_columns(tmp_path: Path, packed: bool) -> None:
    path = build_genai(tmp_path, packed=packed)
    group = next(g for g in find_smoothing_groups(ir.load(path).graph)
                 if g.layers[0].name == "/model/layers.0/attn/o_proj/MatMul")
    absorber = group.absorber
    assert isinstance(absorber, GroupQueryAttentionAbsorber), group.reason
    assert absorber.layer_name == ("/model/layers.0/attn/qkv_proj/MatMul" if packed
                                   else "/model/layers.0/attn/v_proj/MatMul")
    assert absorber.probe() is None  # the map follows from the attributes
    offset = (HEADS + KV_HEADS) * HEAD_SIZE if packed else 0
    np.testing.assert_array_equal(absorber.value_channels, offset + value_channel_map())


@pytest.mark.parametrize("packed", [True, False])
def test_smoothing_alone_is_exact_in_prefill_and_decode(tmp_path: Path, packed: bool) -> None:
    """Text calibration fills the symbolic cache from genai_config.json; the fold keeps prefill and decode
    logits (the present cache carries V / s and comes back as past) within 1e-4."""
    path = build_genai(tmp_path / "fp", packed=packed)
    report = sqonnx.quantize(path, tmp_path / "s.onnx", QuantizeConfig(smooth_only=True, calibration=CALIBRATION))
    o_proj = o_proj_layer(report)
    assert o_proj.smoothing == "MatMul (value columns)" and o_proj.scale_min is not None
    assert o_proj.scale_min != o_proj.scale_max
    for seed in (1, 2):
        for got, expected in zip(generate(tmp_path / "s.onnx", prompt(seed)), generate(path, prompt(seed)),
                                 strict=True):
            np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_quantized_o_proj_is_smoothed(tmp_path: Path) -> None:
    """W8A8 with o_proj smoothed through GroupQueryAttention beats the unsmoothed baseline."""
    path = build_genai(tmp_path / "fp")
    errors = {}
    for smooth in (True, False):
        out = tmp_path / f"q{smooth}.onnx"
        report = sqonnx.quantize(path, out, QuantizeConfig(smooth=smooth, calibration=CALIBRATION))
        o_proj = o_proj_layer(report)
        assert o_proj.quantized
        if smooth:
            assert o_proj.smoothing == "MatMul (value columns)"
            assert o_proj.folded_into == "/model/layers.0/attn/qkv_proj/MatMul"
            assert o_proj.outlier_ratio_after < o_proj.outlier_ratio_before / 3
        expected = np.concatenate(generate(path, prompt(3), steps=0))
        got = np.concatenate(generate(out, prompt(3), steps=0))
        errors[smooth] = float(np.linalg.norm(got - expected) / np.linalg.norm(expected))
    assert errors[True] < errors[False] / 2, errors


@pytest.mark.parametrize(("attributes", "reason"), [
    ({"k_quant_type": "PER_TENSOR"}, "attributes k_quant_type that may change the value path"),
    ({"num_heads": 3}, "do not divide its 64 output channels"),
])
def test_refuses_layouts_it_cannot_prove(tmp_path: Path, attributes: dict, reason: str) -> None:
    path = build_genai(tmp_path, attributes=attributes)
    graph = ir.load(path).graph
    node = next(n for n in graph if n.op_type == "GroupQueryAttention")
    found = GroupQueryAttentionAbsorber.match(Site(node.outputs[0], node.outputs[0], HIDDEN))
    assert isinstance(found, str) and reason in found


def test_output_folder_is_a_genai_folder(tmp_path: Path) -> None:
    """Quantized into another folder, the output gets genai_config.json naming the written model and the
    tokenizer files, so onnxruntime-genai loads the folder unchanged; written beside the input, the input's
    config is left alone (it still names the float model)."""
    path = build_genai(tmp_path / "fp")
    out = tmp_path / "int8" / "decoder.int8.onnx"
    out.parent.mkdir()
    sqonnx.quantize(path, out, QuantizeConfig(calibration=CALIBRATION))
    config = json.loads((out.parent / "genai_config.json").read_text())
    assert config["model"]["decoder"]["filename"] == "decoder.int8.onnx"
    assert config["model"]["decoder"]["num_key_value_heads"] == KV_HEADS
    assert (out.parent / "tokenizer.json").read_bytes() == (path.parent / "tokenizer.json").read_bytes()
    assert sorted(p.name for p in out.parent.iterdir()) == ["decoder.int8.onnx", "genai_config.json", "tokenizer.json"]
    beside = path.with_name("model.int8.onnx")
    sqonnx.quantize(path, beside, QuantizeConfig(calibration=CALIBRATION))
    assert json.loads((path.parent / "genai_config.json").read_text())["model"]["decoder"]["filename"] == "model.onnx"


def test_damaged_genai_config_is_one_line_error(tmp_path: Path) -> None:
    path = build_genai(tmp_path / "fp")
    (path.parent / "genai_config.json").write_text("{not json")
    out = tmp_path / "int8" / "model.onnx"
    out.parent.mkdir()
    with pytest.raises(sqonnx.SqonnxError, match="not a readable onnxruntime-genai config"):
        sqonnx.quantize(path, out, QuantizeConfig(calibration=CALIBRATION))
    assert list(out.parent.iterdir()) == []
