"""ci/scale_models.py: Llama decoders written tensor by tensor are Llamas (numbers equal a numpy Llama), are
optimum's export (node for node, and sqonnx finds every pattern it finds there), and are built in bounded memory.

Tiny shapes only (hidden 64, 3 layers): every test here runs in well under a second but the zoo comparison,
which exports a tiny Llama with optimum on first use (cached afterwards).
"""

from __future__ import annotations

import re
import tracemalloc
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import sqonnx
from ci.scale_models import DATA_FILE, Attention, DType, LlamaShape, build_llama, feeds

GQA = LlamaShape(64, 160, 3, 4, 2, 128)
MHA = LlamaShape(64, 160, 2, 4, 4, 128)  # Llama-2-7B's layout: no repeat_kv in the graph


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _sample(arrays: dict[str, np.ndarray], index: int = 0) -> dict[str, np.ndarray]:
    return {name: array[index] for name, array in arrays.items()}


def _empty_cache(shape: LlamaShape, dtype: DType) -> dict[str, np.ndarray]:
    empty = np.zeros((1, shape.kv_heads, 0, shape.head_dim), dtype)
    return {f"past_key_values.{i}.{kind}": empty for i in range(shape.layers) for kind in ("key", "value")}


# --- a numpy Llama -------------------------------------------------------------------------------------------

def _weights(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Initializers read back from the data file, and each MatMul node's weight name (found through the graph,
    not through the builder)."""
    model = onnx.load(str(path))
    arrays = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    return arrays, {n.name: n.input[1] for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in arrays}


def _rms(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def _rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    half = x.shape[-1] // 2
    return x * cos + np.concatenate([-x[..., half:], x[..., :half]], axis=-1) * sin


def reference_logits(path: Path, shape: LlamaShape, ids: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Logits [seq, vocab] of LlamaForCausalLM in float64 for one sequence: RMSNorm, RoPE, causal GQA attention
    (keys also masked where `mask` is 0), SwiGLU, untied LM head."""
    arrays, matmul = _weights(path)
    d, seq = shape.head_dim, len(ids)
    mask = np.ones(seq, bool) if mask is None else mask.astype(bool)
    allowed = np.tril(np.ones((seq, seq), bool)) & mask[None, :]
    inv_freq = 1.0 / shape.rope_theta ** (np.arange(0, d, 2) / d)
    angles = np.arange(seq)[:, None] * inv_freq[None, :]
    cos, sin = np.cos(np.concatenate([angles, angles], -1)), np.sin(np.concatenate([angles, angles], -1))
    x = arrays["model.embed_tokens.weight"][ids]
    for i in range(shape.layers):
        def w(module: str, i: int = i) -> np.ndarray:
            return arrays[matmul[f"/model/layers.{i}/{module}/MatMul"]]

        h = _rms(x, arrays[f"model.layers.{i}.input_layernorm.weight"], shape.rms_norm_eps)
        q = (h @ w("self_attn/q_proj")).reshape(seq, shape.heads, d).transpose(1, 0, 2)
        k = (h @ w("self_attn/k_proj")).reshape(seq, shape.kv_heads, d).transpose(1, 0, 2)
        v = (h @ w("self_attn/v_proj")).reshape(seq, shape.kv_heads, d).transpose(1, 0, 2)
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        k, v = np.repeat(k, shape.groups, axis=0), np.repeat(v, shape.groups, axis=0)
        scores = np.where(allowed, q @ k.transpose(0, 2, 1) / np.sqrt(d), -np.inf)
        probs = np.where(allowed, np.exp(scores - np.max(scores, -1, keepdims=True, initial=0.0)), 0.0)
        probs /= np.maximum(probs.sum(-1, keepdims=True), 1e-300)  # a row with no key left: zeros
        x = x + (probs @ v).transpose(1, 0, 2).reshape(seq, shape.hidden) @ w("self_attn/o_proj")
        h = _rms(x, arrays[f"model.layers.{i}.post_attention_layernorm.weight"], shape.rms_norm_eps)
        gate = h @ w("mlp/gate_proj")
        x = x + (gate / (1 + np.exp(-gate)) * (h @ w("mlp/up_proj"))) @ w("mlp/down_proj")
    x = _rms(x, arrays["model.norm.weight"], shape.rms_norm_eps)
    return x @ arrays[matmul["/lm_head/MatMul"]]


# --- tests ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("with_past", [False, True], ids=["no-past", "with-past"])
def test_checker_passes_and_onnxruntime_runs(tmp_path: Path, attention: Attention, dtype: DType,
                                             with_past: bool) -> None:
    path = build_llama(tmp_path / "model.onnx", GQA, dtype=dtype, with_past=with_past, attention=attention)
    onnx.checker.check_model(str(path), full_check=True)
    session = _session(path)
    data = feeds(GQA, 3, 9, seed=1, with_past=with_past, dtype=dtype)
    assert [i.name for i in session.get_inputs()] == list(data)
    for index in range(3):
        outputs = session.run(None, _sample(data, index))
        logits = outputs[0]
        assert logits.dtype == np.dtype(dtype) and logits.shape == (1, 9, GQA.vocab)
        logits = logits.astype(np.float32)
        assert np.isfinite(logits).all()
        assert 0.1 < logits.std() < 10.0, logits.std()
        assert len(set(logits[0].argmax(-1).tolist())) > 1  # not one answer for every token
        if with_past:
            assert len(outputs) == 1 + 2 * GQA.layers
            assert all(o.shape == (1, GQA.kv_heads, 9, GQA.head_dim) and o.dtype == np.dtype(dtype)
                       for o in outputs[1:])


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("shape", [GQA, MHA], ids=["gqa", "mha"])
def test_fp32_logits_equal_a_numpy_llama(tmp_path: Path, attention: Attention, shape: LlamaShape) -> None:
    path = build_llama(tmp_path / "model.onnx", shape, attention=attention)
    data = feeds(shape, 2, 11, seed=2, with_past=False)
    session = _session(path)
    for index in range(2):
        ids = data["input_ids"][index, 0]
        expected = reference_logits(path, shape, ids)
        actual = session.run(["logits"], _sample(data, index))[0][0]
        np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_attention_mask_masks_keys(tmp_path: Path, attention: Attention) -> None:
    """Padding: keys where attention_mask is 0 are left out (rows with no key left are not compared: eager
    averages everything there, sdpa gives zeros)."""
    path = build_llama(tmp_path / "model.onnx", GQA, attention=attention)
    data = _sample(feeds(GQA, 1, 8, seed=3, with_past=False))
    data["attention_mask"][0, [0, 1, 5]] = 0
    actual = _session(path).run(["logits"], data)[0][0]
    expected = reference_logits(path, GQA, data["input_ids"][0], data["attention_mask"][0])
    np.testing.assert_allclose(actual[2:], expected[2:], rtol=1e-4, atol=1e-4 * np.abs(expected).max())


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_fp16_computes_the_same_llama(tmp_path: Path, attention: Attention) -> None:
    path = build_llama(tmp_path / "model.onnx", GQA, dtype="float16", attention=attention)
    data = _sample(feeds(GQA, 1, 10, seed=4, with_past=False))
    actual = _session(path).run(["logits"], data)[0][0].astype(np.float64)
    expected = reference_logits(path, GQA, data["input_ids"][0])  # the float16 weights, in float64
    assert np.abs(actual - expected).max() < 0.02 * np.abs(expected).max()


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_cache_continues_a_prefix(tmp_path: Path, attention: Attention) -> None:
    """A prefix run on an empty cache, then the rest on the returned cache, gives the logits of one run over
    all tokens, which are also the no-past model's (same seed, same weights)."""
    path = build_llama(tmp_path / "past" / "model.onnx", GQA, with_past=True, attention=attention)
    plain = build_llama(tmp_path / "plain" / "model.onnx", GQA, attention=attention)
    session = _session(path)
    full = _sample(feeds(GQA, 1, 12, seed=5, with_past=True))
    ids, prefix = full["input_ids"], 7
    whole = session.run(["logits"], full)[0]
    np.testing.assert_allclose(whole, _session(plain).run(["logits"], {k: full[k] for k in
                                                                         ("input_ids", "attention_mask",
                                                                          "position_ids")})[0], rtol=1e-5, atol=1e-5)
    first = session.run(None, {"input_ids": ids[:, :prefix], "attention_mask": np.ones((1, prefix), np.int64),
                               "position_ids": np.arange(prefix)[None], **_empty_cache(GQA, "float32")})
    names = [o.name for o in session.get_outputs()]
    cache = {name.replace("present", "past_key_values"): value for name, value in zip(names[1:], first[1:],
                                                                                      strict=True)}
    rest = session.run(["logits"], {"input_ids": ids[:, prefix:], "attention_mask": np.ones((1, 12), np.int64),
                                    "position_ids": np.arange(prefix, 12)[None], **cache})[0]
    np.testing.assert_allclose(first[0][0], whole[0, :prefix], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(rest[0], whole[0, prefix:], rtol=1e-4, atol=1e-5)


def test_build_memory_is_one_chunk_not_the_model(tmp_path: Path) -> None:
    """A 42 MB model built under tracemalloc: the peak stays below twice its largest tensor (the 27 GB build is
    bounded the same way), the graph proto holds no weights, every initializer points into the data file."""
    shape = LlamaShape(512, 1376, 3, 8, 2, 2048)
    largest = shape.vocab * shape.hidden * 4
    tracemalloc.start()
    try:
        path = build_llama(tmp_path / "model.onnx", shape)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    data = (tmp_path / DATA_FILE).stat().st_size
    assert data >= shape.parameters * 4 > 40e6
    assert peak < 2 * largest, f"peak {peak / 1e6:.1f} MB for a largest tensor of {largest / 1e6:.1f} MB"
    assert path.stat().st_size < 1e6
    model = onnx.load(str(path), load_external_data=False)
    assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    assert {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"} == {DATA_FILE}


def test_weights_are_seeded(tmp_path: Path) -> None:
    paths = [build_llama(tmp_path / name / "model.onnx", GQA, seed=seed) for name, seed in
             (("a", 0), ("b", 0), ("c", 1))]
    a, b, c = ((p.parent / DATA_FILE).read_bytes() for p in paths)
    assert a == b and a != c
    assert paths[0].read_bytes() == paths[1].read_bytes()
    first, again = feeds(GQA, 2, 5, 7, with_past=True), feeds(GQA, 2, 5, 7, with_past=True)
    assert all(np.array_equal(first[k], again[k]) for k in first)
    assert first["past_key_values.0.key"].shape == (2, 1, GQA.kv_heads, 0, GQA.head_dim)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_sqonnx_finds_every_pattern(tmp_path: Path, attention: Attention) -> None:
    """What sqonnx does to optimum's Llama exports it does here: every linear quantized, the residual stream
    rotated, every group smoothed (q/k/v and gate/up through the norm's Mul, o_proj through v_proj's columns,
    down_proj through up_proj's)."""
    path = build_llama(tmp_path / "model.onnx", GQA, attention=attention)
    np.savez(tmp_path / "calib.npz", **feeds(GQA, 4, 16, seed=6, with_past=False))
    config = sqonnx.QuantizeConfig(calibration=sqonnx.CalibrationConfig(data=tmp_path / "calib.npz", num_samples=4))
    report = sqonnx.quantize(path, tmp_path / "model.int8.onnx", config)
    assert len(report.quantized_layers) == len(report.layers) == 7 * GQA.layers + 1
    assert report.settings["rotation"].startswith("rotated"), report.settings["rotation"]
    assert len(report.smoothed_layers) == len(report.quantized_layers)
    folds = {re.sub(r"layers\.\d+", "layers.N", layer.name): (layer.smoothing, layer.folded_into.rsplit("/", 2)[-2])
             for layer in report.layers}
    assert folds == {
        **{f"/model/layers.N/self_attn/{p}_proj/MatMul": ("Mul (per-channel weight)", "input_layernorm")
           for p in "qkv"},
        **{f"/model/layers.N/mlp/{p}_proj/MatMul": ("Mul (per-channel weight)", "post_attention_layernorm")
           for p in ("gate", "up")},
        "/model/layers.N/self_attn/o_proj/MatMul": ("MatMul (value columns)", "v_proj"),
        "/model/layers.N/mlp/down_proj/MatMul": ("MatMul (output columns through Mul)", "up_proj"),
        "/lm_head/MatMul": ("Mul (per-channel weight)", "norm"),
    }


def _nodes(path: Path) -> list[tuple[object, ...]]:
    """Each node as (op, name, inputs, outputs, attributes), the exporter's running numbers of unscoped names
    (onnx::MatMul_707, Constant_350) dropped."""
    def plain(name: str) -> str:
        return re.sub(r"^(onnx::\w+?|Constant)_\d+$", r"\1", name)

    def attribute(a: onnx.AttributeProto) -> object:
        value = onnx.helper.get_attribute_value(a)
        if isinstance(value, onnx.TensorProto):
            array = numpy_helper.to_array(value)
            return str(array.dtype), array.shape, np.round(array.astype(np.float64), 6).tolist()
        return value

    graph = onnx.load(str(path), load_external_data=False).graph
    return [(n.op_type, plain(n.name), [plain(i) for i in n.input], [plain(o) for o in n.output],
             {a.name: attribute(a) for a in n.attribute}) for n in graph.node]


@pytest.mark.zoo
def test_graph_is_optimums_export_node_for_node(tmp_path: Path) -> None:
    """models/zoo.py's Llama (eager attention, the zoo's export) and ours at its shape: the same nodes, names,
    constants and inputs/outputs (the sdpa form and float16 were compared the same way when the builder was
    written; exporting those here would cost a minute)."""
    from models import zoo

    spec = zoo.FAMILIES["llama"].kwargs
    exported = zoo.build("llama")
    shape = LlamaShape(spec["hidden_size"], spec["intermediate_size"], spec["num_hidden_layers"],
                       spec["num_attention_heads"], spec["num_key_value_heads"], spec["vocab_size"],
                       rms_norm_eps=1e-6)
    ours = build_llama(tmp_path / "model.onnx", shape, attention="eager")
    assert _nodes(ours) == _nodes(exported)
    theirs, mine = (onnx.load(str(p), load_external_data=False) for p in (exported, ours))
    for m in (mine, theirs):
        assert (m.ir_version, [(o.domain, o.version) for o in m.opset_import]) == (8, [("", 18)])
    for a, b in ((theirs.graph.input, mine.graph.input), (theirs.graph.output, mine.graph.output)):
        assert [(v.name, v.type) for v in a] == [(v.name, v.type) for v in b]
    assert sorted((re.sub(r"_\d+$", "", t.name), t.data_type, list(t.dims)) for t in theirs.graph.initializer) == \
        sorted((re.sub(r"_\d+$", "", t.name), t.data_type, list(t.dims)) for t in mine.graph.initializer)
