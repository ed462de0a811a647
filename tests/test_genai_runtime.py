"""Opt-in: onnxruntime-genai itself loads the folder sqonnx writes and generates the tokens onnxruntime does.

onnxruntime-genai is not a dependency of sqonnx (its builder wants a newer transformers); this test runs its
generator in the builder's environment (`make genai-smollm2` creates .cache/genai-venv; or point
SQONNX_GENAI_PYTHON at any Python with onnxruntime-genai) and skips when there is none.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

import sqonnx
from models import REPO
from tests.test_genai import CALIBRATION, build_genai, generate

GENAI_PYTHON = Path(os.environ.get("SQONNX_GENAI_PYTHON", REPO / ".cache" / "genai-venv" / "bin" / "python"))
pytestmark = pytest.mark.skipif(not GENAI_PYTHON.exists(), reason=f"no onnxruntime-genai environment at {GENAI_PYTHON} "
                                "(make genai-smollm2 creates one; or set SQONNX_GENAI_PYTHON)")
NEW_TOKENS = 8


def _complete_genai_config(folder: Path) -> None:
    """What the model builder writes besides the decoder's shape: model type, token ids, io names, search."""
    path = folder / "genai_config.json"
    config = json.loads(path.read_text())
    decoder = config["model"]["decoder"]
    decoder.update({"session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                    "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                               "past_key_names": "past_key_values.%d.key",
                               "past_value_names": "past_key_values.%d.value"},
                    "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                                "present_value_names": "present.%d.value"}})
    vocab = len(json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"])
    config["model"].update({"type": "llama", "bos_token_id": 0, "eos_token_id": [0],
                            "pad_token_id": 0, "context_length": 64, "vocab_size": vocab})
    config["search"] = {"do_sample": False, "max_length": 64, "num_beams": 1, "past_present_share_buffer": False}
    path.write_text(json.dumps(config, indent=2))


@pytest.mark.parametrize("decode", [None, sqonnx.Weights.INT4], ids=["w8a8", "decode-int4"])
def test_genai_generator_runs_the_quantized_folder(tmp_path: Path, decode: sqonnx.Weights | None) -> None:
    """--decode-weights int4 too: genai runs the one graph as it is, the prompt through the W8A8 branch and every
    generated token through the W4A8 one (the `If` on the token count), as onnxruntime does."""
    model = build_genai(tmp_path / "fp")
    _complete_genai_config(model.parent)
    out = tmp_path / "int8" / "model.onnx"
    out.parent.mkdir()
    report = sqonnx.quantize(model, out, sqonnx.QuantizeConfig(calibration=CALIBRATION, decode_weights=decode,
                                                               allow_lossy=decode is not None))
    assert report.quantized_layers and report.kernels is not None and not report.kernels.unfused
    prompt = np.random.default_rng(3).integers(1, 2000, 12).astype(np.int64)
    (tmp_path / "prompt.json").write_text(json.dumps(prompt.tolist()))
    script = REPO / "ci" / "genai_generate.py"
    try:
        done = subprocess.run([str(GENAI_PYTHON), str(script), str(out.parent), str(tmp_path / "prompt.json"),
                               str(NEW_TOKENS)], capture_output=True, text=True, check=False, timeout=600)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"onnxruntime-genai's generator did not finish in 600 s; stdout: {exc.stdout!r}; "
                             f"stderr: {exc.stderr!r}") from None
    assert done.returncode == 0, done.stderr[-3000:]
    tokens = json.loads(done.stdout.strip().splitlines()[-1])["tokens"]
    # The same quantized graph run step by step through onnxruntime with its own cache (tests/test_genai.py).
    expected = [int(step[-1].argmax()) for step in generate(out, prompt, steps=NEW_TOKENS - 1)]
    assert tokens == expected
