"""Text calibration: the model's tokenizer, its special tokens, and no padding/truncation surprises."""

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from sqonnx.calibrators.data import calibration_feeds, pydoc_text
from sqonnx.config import CalibrationConfig
from sqonnx.errors import SqonnxError


def _bert_like_tokenizer(folder: Path) -> None:
    words = sorted({w for w in pydoc_text("calibration").split()})[:5000]
    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, **{w: i + 4 for i, w in enumerate(words)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                             special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    # As transformers saves MiniLM's: pad and truncate everything to 128 tokens.
    tokenizer.enable_padding(length=128, pad_id=0)
    tokenizer.enable_truncation(max_length=128)
    tokenizer.save(str(folder / "tokenizer.json"))


def _graph(folder: Path) -> ir.Graph:
    inputs = [ir.Value(name=n, type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape(["batch", "seq"]))
              for n in ("input_ids", "attention_mask", "token_type_ids")]
    return ir.Graph(inputs, [], nodes=[], name="g")


def test_windows_carry_special_tokens_and_differ(tmp_path: Path) -> None:
    _bert_like_tokenizer(tmp_path)
    feeds = calibration_feeds(_graph(tmp_path), tmp_path, CalibrationConfig(num_samples=6, seq_len=64))
    samples = list(feeds)
    assert feeds.count == len(samples) == 6
    ids = np.stack([s["input_ids"][0] for s in samples])
    assert ids.shape == (6, 64) and ids.dtype == np.int64
    assert np.all(ids[:, 0] == 2) and np.all(ids[:, -1] == 3)  # [CLS] ... [SEP]
    assert not np.any(ids[:, 1:-1] == 0)  # no padding inside the text
    assert len({row.tobytes() for row in ids}) == 6  # truncation did not collapse the text to one window
    assert np.all(samples[0]["attention_mask"] == 1) and np.all(samples[0]["token_type_ids"] == 0)


def test_pydoc_splits_are_disjoint() -> None:
    calibration, evaluation = pydoc_text("calibration"), pydoc_text("evaluation")
    assert len(evaluation) > 20_000 and len(calibration) > 3 * len(evaluation)
    assert evaluation[:2000] not in calibration


def test_text_too_short(tmp_path: Path) -> None:
    _bert_like_tokenizer(tmp_path)
    short = tmp_path / "short.txt"
    short.write_text("only a few words here")
    with pytest.raises(SqonnxError, match="too few for --seq-len 64"):
        calibration_feeds(_graph(tmp_path), tmp_path, CalibrationConfig(data=short, num_samples=2, seq_len=64))


def test_input_text_cannot_fill(tmp_path: Path) -> None:
    """A model input that is not a token input gets a clear error instead of a made-up tensor."""
    _bert_like_tokenizer(tmp_path)
    graph = _graph(tmp_path)
    graph.inputs.append(ir.Value(name="pixel_values", type=ir.TensorType(ir.DataType.FLOAT),
                                 shape=ir.Shape(["batch", 3, 224, 224])))
    feeds = calibration_feeds(graph, tmp_path, CalibrationConfig(num_samples=2, seq_len=32))
    with pytest.raises(SqonnxError, match="model input 'pixel_values' cannot be filled from text"):
        next(iter(feeds))


def test_with_past_export_gets_an_empty_cache(tmp_path: Path) -> None:
    """A with-past decoder export is calibrated as a prefill: every past_key_values input is empty."""
    _bert_like_tokenizer(tmp_path)
    graph = _graph(tmp_path)
    for kind in ("key", "value"):
        graph.inputs.append(ir.Value(name=f"past_key_values.0.{kind}", type=ir.TensorType(ir.DataType.FLOAT),
                                     shape=ir.Shape(["batch", 3, "past_sequence_length", 8])))
    feed = next(iter(calibration_feeds(graph, tmp_path, CalibrationConfig(num_samples=2, seq_len=32))))
    assert feed["past_key_values.0.key"].shape == (1, 3, 0, 8)
    assert feed["past_key_values.0.value"].dtype == np.float32
    assert feed["input_ids"].shape == (1, 32)


def _genai_graph(folder: Path) -> ir.Graph:
    """The inputs onnxruntime-genai's model builder writes: no position_ids, a mask over past + new tokens,
    and a cache whose head size is symbolic (`kv_cache_dim`)."""
    _bert_like_tokenizer(folder)
    inputs = [ir.Value(name="input_ids", type=ir.TensorType(ir.DataType.INT64),
                       shape=ir.Shape(["batch_size", "sequence_length"])),
              ir.Value(name="attention_mask", type=ir.TensorType(ir.DataType.INT64),
                       shape=ir.Shape(["batch_size", "total_sequence_length"]))]
    for layer in range(2):
        for kind in ("key", "value"):
            inputs.append(ir.Value(name=f"past_key_values.{layer}.{kind}", type=ir.TensorType(ir.DataType.FLOAT),
                                   shape=ir.Shape(["batch_size", 3, "past_sequence_length", "kv_cache_dim"])))
    return ir.Graph(inputs, [], nodes=[], name="g")


@pytest.mark.parametrize("config", [
    ("genai_config.json", {"model": {"decoder": {"num_key_value_heads": 3, "head_size": 16, "hidden_size": 96}}}),
    ("config.json", {"num_attention_heads": 6, "num_key_value_heads": 3, "head_dim": 16, "hidden_size": 64}),
    ("config.json", {"num_attention_heads": 6, "num_key_value_heads": 3, "hidden_size": 96}),  # 96 / 6
])
def test_symbolic_cache_dims_come_from_the_config(tmp_path: Path, config: tuple[str, dict]) -> None:
    """genai's cache inputs leave the head size symbolic; genai_config.json or config.json states it."""
    import json

    graph = _genai_graph(tmp_path)
    (tmp_path / config[0]).write_text(json.dumps(config[1]))
    feed = next(iter(calibration_feeds(graph, tmp_path, CalibrationConfig(num_samples=2, seq_len=32))))
    assert sorted(feed) == sorted(str(v.name) for v in graph.inputs)
    for layer in range(2):
        for kind in ("key", "value"):
            cache = feed[f"past_key_values.{layer}.{kind}"]
            assert cache.shape == (1, 3, 0, 16) and cache.dtype == np.float32
    assert feed["input_ids"].shape == feed["attention_mask"].shape == (1, 32)  # total length = new tokens
    assert np.all(feed["attention_mask"] == 1)


def test_fixed_cache_dims_win_over_the_config(tmp_path: Path) -> None:
    """The graph's own fixed dimensions are the truth; the config only fills symbolic ones."""
    import json

    graph = _genai_graph(tmp_path)
    (tmp_path / "genai_config.json").write_text(json.dumps({"model": {"decoder": {"num_key_value_heads": 9,
                                                                                    "head_size": 16}}}))
    feed = next(iter(calibration_feeds(graph, tmp_path, CalibrationConfig(num_samples=2, seq_len=32))))
    assert feed["past_key_values.0.key"].shape == (1, 3, 0, 16)  # 3 heads from the graph, not the config's 9


@pytest.mark.parametrize("config", [None, "{not json", '{"model": {"decoder": {"head_size": "64"}}}'])
def test_symbolic_cache_dims_without_a_config(tmp_path: Path, config: str | None) -> None:
    """No (usable) config beside the model: the error names the input and says why."""
    graph = _genai_graph(tmp_path)
    if config is not None:
        (tmp_path / "genai_config.json").write_text(config)
    feeds = calibration_feeds(graph, tmp_path, CalibrationConfig(num_samples=2, seq_len=32))
    with pytest.raises(SqonnxError, match="model input 'past_key_values.0.key' cannot be filled from text; its "
                                          "heads or head size are symbolic"):
        next(iter(feeds))


def _with_past_graph(folder: Path, outputs: tuple[str, ...] = ("logits", "present.0.key", "present.0.value")
                     ) -> ir.Graph:
    _bert_like_tokenizer(folder)
    graph = _graph(folder)
    graph.inputs.pop()  # token_type_ids
    for kind in ("key", "value"):
        graph.inputs.append(ir.Value(name=f"past_key_values.0.{kind}", type=ir.TensorType(ir.DataType.FLOAT),
                                     shape=ir.Shape(["batch", 3, "past_sequence_length", 8])))
    graph.outputs.extend(ir.Value(name=name, type=ir.TensorType(ir.DataType.FLOAT)) for name in outputs)
    return graph


def test_decode_chains_only_for_text_and_a_cache(tmp_path: Path) -> None:
    """Text calibration of a with-past model adds decode chains; decode_steps 0, an .npz (what the user gave,
    exactly) and a model without a cache get none."""
    graph = _with_past_graph(tmp_path)
    feeds = calibration_feeds(graph, tmp_path, CalibrationConfig(num_samples=8, seq_len=32, decode_steps=20))
    assert [chain.steps for chain in feeds.decode] == [5, 5, 5, 5]
    assert feeds.description == "built-in pydoc topics, 8 x 32 tokens + 20 decode steps"
    prompt = feeds.decode[0].prompt
    assert prompt["input_ids"].shape == (1, 16) and prompt["past_key_values.0.key"].shape == (1, 3, 0, 8)
    assert feeds.decode[0].present == {"past_key_values.0.key": "present.0.key",
                                       "past_key_values.0.value": "present.0.value"}
    # The prompts come from the first three quarters of the windows (--alpha auto holds back the last).
    windows = [sample["input_ids"][0] for sample in feeds]
    starts = [next(i for i, w in enumerate(windows) if np.array_equal(w[:16], c.prompt["input_ids"][0]))
              for c in feeds.decode]
    assert starts == [0, 1, 3, 5]

    none = calibration_feeds(graph, tmp_path, CalibrationConfig(num_samples=8, seq_len=32, decode_steps=0))
    assert none.decode == [] and none.description == "built-in pydoc topics, 8 x 32 tokens"
    npz = tmp_path / "feeds.npz"
    np.savez(npz, input_ids=np.ones((2, 1, 4), np.int64), attention_mask=np.ones((2, 1, 6), np.int64),
             **{f"past_key_values.0.{kind}": np.zeros((2, 1, 3, 2, 8), np.float32) for kind in ("key", "value")})
    assert calibration_feeds(graph, tmp_path, CalibrationConfig(data=npz, decode_steps=20)).decode == []
    assert calibration_feeds(_graph(tmp_path), tmp_path, CalibrationConfig(decode_steps=20, seq_len=32)).decode == []


def test_no_present_output_is_prefill_only(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    graph = _with_past_graph(tmp_path, ("logits", "present.0.key"))
    with caplog.at_level("INFO", logger="sqonnx.calibrators.data"):
        feeds = calibration_feeds(graph, tmp_path, CalibrationConfig(num_samples=8, seq_len=32))
    assert feeds.decode == []
    assert [r.getMessage() for r in caplog.records] == ["calibrating prefill only: no output 'present.0.value' to "
                                                        "decode from"]
