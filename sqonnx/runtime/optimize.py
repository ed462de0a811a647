"""`--optimize`: onnxruntime's transformer optimizer (`onnxruntime.transformers`, the maintained successor of
the onnxruntime-tools package) runs before smoothing, so the saved INT8 graph already holds the fused
LayerNormalization / SkipLayerNormalization / SimplifiedLayerNormalization / Gelu / BiasGelu ops.

Attention fusion stays off: the fused Attention op packs q, k and v into one weight inside a contrib op,
which would take those layers away from smoothing and from the integer MatMuls. The smoothing passes
understand every fused norm the optimizer emits (they absorb 1/s like the unfused norm would).
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import logging
from pathlib import Path

import onnx

from sqonnx.errors import SqonnxError

logger = logging.getLogger(__name__)

# Hugging Face `model_type` -> the optimizer's model type. Decoder families use the BERT optimizer too:
# it is the one that fuses RMSNorm into SimplifiedLayerNormalization and residual + norm into Skip*.
OPTIMIZER_MODEL_TYPES = {
    "bert": "bert", "roberta": "bert", "xlm-roberta": "bert", "distilbert": "bert", "electra": "bert",
    "mpnet": "bert", "camembert": "bert", "gpt2": "gpt2", "llama": "bert", "mistral": "bert", "qwen2": "bert",
    "qwen3": "bert", "gemma": "bert", "phi3": "bert",
}
FUSED_OPS = ("LayerNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization",
             "SkipSimplifiedLayerNormalization", "Gelu", "FastGelu", "BiasGelu")


def optimizer_model_type(model_path: Path) -> str:
    """The optimizer's model type, from the config.json that optimum writes beside the model."""
    config = model_path.parent / "config.json"
    try:
        family = json.loads(config.read_text()).get("model_type", "")
    except (OSError, ValueError):
        raise SqonnxError(f"--optimize needs the model's config.json beside {model_path.name} (optimum writes it) "
                          "to tell the architecture; copy it there or drop --optimize") from None
    if family not in OPTIMIZER_MODEL_TYPES:
        raise SqonnxError(f"--optimize does not know the '{family}' architecture (known: "
                          f"{', '.join(sorted(OPTIMIZER_MODEL_TYPES))}); drop --optimize")
    return OPTIMIZER_MODEL_TYPES[family]


def fuse_transformer_ops(model_path: Path, workdir: Path) -> tuple[Path, dict[str, int]]:
    """Optimized copy of the model in `workdir`, and how many of each fused op it gained."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    model_type = optimizer_model_type(model_path)
    options = FusionOptions(model_type)
    options.enable_attention = False
    options.enable_rotary_embeddings = False
    options.enable_embed_layer_norm = False  # keeps the embedding Gathers and their outputs as they are
    options.enable_qordered_matmul = False
    before = _op_counts(onnx.load(str(model_path), load_external_data=False))
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            optimized = optimize_model(str(model_path), model_type=model_type, num_heads=0, hidden_size=0,
                                       optimization_options=options, opt_level=0)
    except Exception as exc:  # the optimizer raises many types on graphs it does not expect
        raise SqonnxError(f"onnxruntime's transformer optimizer failed on {model_path.name} "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                          "run without --optimize") from None
    after = _op_counts(optimized.model)
    output = workdir / "optimized.onnx"
    optimized.save_model_to_file(str(output), use_external_data_format=True, all_tensors_to_one_file=True)
    fused = {op: after[op] - before[op] for op in FUSED_OPS if after[op] > before[op]}
    if not fused:
        logger.warning("--optimize: onnxruntime's optimizer found nothing to fuse in %s", model_path.name)
    return output, fused


def _op_counts(model: onnx.ModelProto) -> collections.Counter[str]:
    return collections.Counter(node.op_type for node in model.graph.node)
