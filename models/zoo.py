"""A zoo of tiny transformer families, exported with optimum, for testing sqonnx beyond Llama and BERT.

No model hub is reachable from CI, so every model is built from a transformers *config* with random
weights. Plain random weights do not look like a trained LLM: all norm weights are 1 (optimum then
deduplicates them into one shared initializer) and activations have no outlier channels, so SmoothQuant
would have nothing to do and graph matchers would see an export real models never produce. `_make_trained_like`
gives every norm its own weight and bias, plants the same outlier channels in every norm weight (as in
real LLMs, where a few hidden channels are large in every layer) and shrinks the readers' weight rows for
those channels, so the product stays sane while the activations keep their outliers.

Exports are tiny (2 layers, hidden 64) and cached under `$SQONNX_CACHE/zoo` (default `.cache/zoo`), keyed by
a hash of the spec, the exporter versions and `ZOO_VERSION`, so a test run builds each family once.
Mixtral is not exportable by optimum or torch.onnx as is; `_dense_moe_forward` computes every expert on
every token and weights it by the top-k-masked, renormalized router probabilities (the same output).

    .venv/bin/python -m models.zoo            # builds every family and prints the build times
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import onnx_ir as ir

REPO = Path(__file__).resolve().parent.parent

# Bump when the weights, the export or the layout of the cache change: old cache entries are then ignored.
ZOO_VERSION = 1

# Hidden channels made large in every norm weight (and small in the readers' weight rows).
OUTLIER_CHANNELS = (5, 17, 40)
OUTLIER_SCALE = 20.0
READER_ROW_SCALE = 0.1

_SMALL: Mapping[str, Any] = MappingProxyType({
    "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
    "vocab_size": 256, "max_position_embeddings": 128,
})
_GQA: Mapping[str, Any] = MappingProxyType({**_SMALL, "num_key_value_heads": 2})


@dataclass(frozen=True)
class FamilySpec:
    """How to build one family: a transformers config class and its arguments, and the optimum task.

    `config` names a class in `transformers`; `model` is `AutoModelForCausalLM` / `AutoModel` or a
    concrete class. `kwargs` is read-only so a spec is a constant and its hash keys the cache."""

    config: str
    kwargs: Mapping[str, Any]
    is_decoder: bool = True
    model: str = "AutoModelForCausalLM"
    # Gemma-style norms compute x * (1 + w): the weight is stored as (effective scale - 1).
    norm_plus_one: bool = False

    @property
    def task(self) -> str:
        """optimum task: decoders without past (one graph), encoders' last hidden state."""
        return "text-generation" if self.is_decoder else "feature-extraction"


FAMILIES: dict[str, FamilySpec] = {
    "llama": FamilySpec("LlamaConfig", _GQA),
    "mistral": FamilySpec("MistralConfig", _GQA),
    "qwen2": FamilySpec("Qwen2Config", _GQA),
    "qwen3": FamilySpec("Qwen3Config", {**_GQA, "head_dim": 16}),
    "phi3": FamilySpec("Phi3Config", {**_GQA, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
                                      "original_max_position_embeddings": 128}),
    "gemma3": FamilySpec("Gemma3TextConfig", {**_GQA, "head_dim": 16, "query_pre_attn_scalar": 16,
                                              "sliding_window": 64}, norm_plus_one=True),
    "opt": FamilySpec("OPTConfig", {**{k: v for k, v in _SMALL.items() if k != "intermediate_size"},
                                    "ffn_dim": 128, "word_embed_proj_dim": 64}),
    "bloom": FamilySpec("BloomConfig", {"hidden_size": 64, "n_layer": 2, "n_head": 4, "vocab_size": 256}),
    "falcon": FamilySpec("FalconConfig", {**{k: v for k, v in _SMALL.items() if k != "intermediate_size"},
                                          "ffn_hidden_size": 128, "num_kv_heads": 2,
                                          "new_decoder_architecture": True}),
    "falcon_old": FamilySpec("FalconConfig", {**{k: v for k, v in _SMALL.items() if k != "intermediate_size"},
                                              "ffn_hidden_size": 128, "new_decoder_architecture": False,
                                              "parallel_attn": True, "multi_query": True}),
    "gpt2": FamilySpec("GPT2Config", {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_inner": 128, "vocab_size": 256,
                                      "n_positions": 128, "bos_token_id": 255, "eos_token_id": 255}),
    "gpt_neox": FamilySpec("GPTNeoXConfig", {**_SMALL, "bos_token_id": 0, "eos_token_id": 2}),
    "phi": FamilySpec("PhiConfig", {**_SMALL, "bos_token_id": 1, "eos_token_id": 2}),
    "bert": FamilySpec("BertConfig", _SMALL, is_decoder=False, model="AutoModel"),
    # RoBERTa's positions start after padding_idx (1), hence two extra positions.
    "roberta": FamilySpec("RobertaConfig", {**_SMALL, "max_position_embeddings": 130, "type_vocab_size": 1},
                          is_decoder=False, model="AutoModel"),
    "mixtral": FamilySpec("MixtralConfig", {**_GQA, "num_local_experts": 4, "num_experts_per_tok": 2}),
}

# Linear layers whose input is not a norm output (attention output projections): their rows are left
# alone; every other linear reading a hidden-size input reads a norm output and gets small outlier rows.
_NOT_NORM_READERS = re.compile(r"(o_proj|out_proj|attention\.dense|self_attention\.dense|self_attn\.dense"
                               r"|attention\.output\.dense|attn\.c_proj)$")


def cache_root() -> Path:
    """`$SQONNX_CACHE/zoo`, or `.cache/zoo` in the repository (beside `models.cache_dir()`'s `.cache/models`)."""
    env = os.environ.get("SQONNX_CACHE")
    return Path(env) / "zoo" if env else REPO / ".cache" / "zoo"


def _seed(family: str) -> int:
    """A per-family seed that does not depend on Python's hash randomization."""
    return zlib.crc32(family.encode())


def spec_hash(family: str) -> str:
    """Short hash of everything that shapes an export, so a changed spec or exporter never reuses a stale one."""
    spec = FAMILIES[family]
    key = {
        "family": family, "config": spec.config, "kwargs": dict(spec.kwargs), "model": spec.model,
        "task": spec.task, "norm_plus_one": spec.norm_plus_one, "zoo": ZOO_VERSION,
        "versions": [version(p) for p in ("transformers", "optimum-onnx", "torch")],
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:10]


def model_dir(family: str, dtype: str = "float32") -> Path:
    """Where `build` puts (or finds) the family's export: model.onnx and config.json."""
    return cache_root() / (f"{family}-{spec_hash(family)}" if dtype == "float32" else
                           f"{family}-{dtype}-{spec_hash(family)}")


def build(family: str, dtype: str = "float32") -> Path:
    """The family's exported model.onnx, exported on first use and cached afterwards. `dtype` "float16" or
    "bfloat16": the same weights exported from the model cast to that type (what `optimum-cli --dtype fp16`
    writes; optimum asks for a GPU there, the exporter itself does not)."""
    if family not in FAMILIES:
        raise KeyError(f"unknown zoo family '{family}'; known: {', '.join(FAMILIES)}")
    target = model_dir(family, dtype)
    if (target / "model.onnx").exists():
        return target / "model.onnx"
    from models import export_into

    target.parent.mkdir(parents=True, exist_ok=True)
    model = make_model(family)
    if dtype != "float32":
        import torch

        model = model.to(getattr(torch, dtype))
    with _exportable(family):
        return export_into(target, model, None, FAMILIES[family].task)


def make_model(family: str, *, trained_like: bool = True) -> Any:
    """The family's PyTorch model in eval mode, with trained-like weights unless `trained_like` is False
    (the transformers default init, kept for surveying what optimum does with identical norm weights)."""
    import torch
    import transformers

    spec = FAMILIES[family]
    config = getattr(transformers, spec.config)(**spec.kwargs)
    torch.manual_seed(_seed(family))  # the default init is random too; seed it so exports are reproducible
    model = getattr(transformers, spec.model).from_config(config, attn_implementation="eager")
    model.eval()
    if trained_like:
        _make_trained_like(model, spec, _seed(family))
    return model


def _make_trained_like(model: Any, spec: FamilySpec, seed: int) -> None:
    """Overwrite the default init in place: distinct norm weights and biases with planted outlier channels,
    N(0, 0.02..0.05) linear weights, non-zero linear biases, small norm-reader rows for the outlier channels.

    Walks `named_modules()` in its fixed order with one seeded generator, so the weights are reproducible."""
    import torch
    from transformers.pytorch_utils import Conv1D

    generator = torch.Generator().manual_seed(seed)
    hidden = model.config.hidden_size
    outliers = torch.tensor(OUTLIER_CHANNELS)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator)

    embedding = model.get_input_embeddings().weight
    with torch.no_grad():
        for name, module in model.named_modules():
            kind = type(module).__name__
            weight = getattr(module, "weight", None)
            bias = getattr(module, "bias", None)
            if "Norm" in kind and isinstance(weight, torch.nn.Parameter) and weight.ndim == 1:
                scale = 1.0 + 0.1 * randn(weight.numel())
                if weight.numel() == hidden:
                    scale[outliers] *= OUTLIER_SCALE
                weight.copy_(scale - 1.0 if spec.norm_plus_one else scale)
                if isinstance(bias, torch.nn.Parameter):
                    bias.copy_(0.1 * randn(bias.numel()))
            elif isinstance(module, torch.nn.Linear | Conv1D):
                if module.weight is embedding:  # a tied LM head keeps the embedding's (normal) init
                    continue
                std = 0.02 + 0.03 * torch.rand(1, generator=generator).item()
                module.weight.copy_(std * randn(*module.weight.shape))
                if isinstance(bias, torch.nn.Parameter):
                    bias.copy_(0.02 * randn(bias.numel()))
                # nn.Linear stores [out, in], Conv1D [in, out]: the outlier rows are input channels.
                in_axis = 0 if isinstance(module, Conv1D) else 1
                if module.weight.shape[in_axis] == hidden and not _NOT_NORM_READERS.search(name):
                    rows = module.weight.index_select(in_axis, outliers) * READER_ROW_SCALE
                    module.weight.index_copy_(in_axis, outliers, rows)


def _dense_moe_forward(self: Any, hidden_states: Any) -> tuple[Any, Any]:
    """Mixtral's sparse MoE block without data-dependent control flow: every expert runs on every token
    and its output is weighted by the router probability kept by top-k (zero otherwise), renormalized over
    the kept experts. Same output as the sparse loop (up to float summation order), but exportable."""
    import torch

    batch, seq, hidden = hidden_states.shape
    flat = hidden_states.reshape(-1, hidden)
    router_logits = self.gate(flat)
    probs = torch.softmax(router_logits, dim=-1)
    kth = torch.topk(probs, self.top_k, dim=-1).values[:, -1:]
    kept = probs * (probs >= kth).to(probs.dtype)
    kept = kept / kept.sum(dim=-1, keepdim=True)
    out = torch.zeros_like(flat)
    for index, expert in enumerate(self.experts):
        out = out + expert(flat) * kept[:, index : index + 1]
    return out.reshape(batch, seq, hidden), router_logits


@contextlib.contextmanager
def _exportable(family: str) -> Iterator[None]:
    """Whatever a family needs for optimum to export it: for Mixtral, an optimum config (Llama's inputs and
    outputs) registered for the model type, and the dense MoE forward while exporting."""
    if family != "mixtral":
        yield
        return
    from optimum.exporters.onnx.model_configs import LlamaOnnxConfig
    from optimum.exporters.tasks import TasksManager
    from transformers.models.mixtral import modeling_mixtral

    if "mixtral" not in TasksManager._SUPPORTED_MODEL_TYPE or "onnx" not in TasksManager._SUPPORTED_MODEL_TYPE.get(
            "mixtral", {}):
        TasksManager.create_register("onnx")("mixtral", "text-generation")(
            type("MixtralOnnxConfig", (LlamaOnnxConfig,), {}))
    block = modeling_mixtral.MixtralSparseMoeBlock
    original = block.forward
    block.forward = _dense_moe_forward
    try:
        yield
    finally:
        block.forward = original


def pytest_params(families: Iterable[str] | None = None) -> list[Any]:
    """`pytest.param`s, one per family (all by default), id'd by family and marked `zoo`, so any test module
    can write `@pytest.mark.parametrize("family", zoo.pytest_params())` and call `zoo.build(family)`."""
    import pytest

    return [pytest.param(f, id=f, marks=pytest.mark.zoo) for f in (families or FAMILIES)]


DECODERS = tuple(f for f, spec in FAMILIES.items() if spec.is_decoder)
ENCODERS = tuple(f for f, spec in FAMILIES.items() if not spec.is_decoder)


def _read_inputs(model_path: Path) -> list[tuple[str, np.dtype]]:
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    return [(i.name, np.dtype(onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type)))
            for i in model.graph.input]


def _vocab_size(model_path: Path) -> int:
    config = json.loads((model_path.parent / "config.json").read_text())
    return int(config.get("vocab_size") or config["text_config"]["vocab_size"])


def feeds(model_path: Path, samples: int, seq: int, seed: int) -> list[dict[str, np.ndarray]]:
    """One feed dict per sample for the model's own inputs, batch 1: random token ids in the vocabulary,
    an all-ones attention mask, positions 0..seq-1, token types 0."""
    rng = np.random.default_rng(seed)
    vocab = _vocab_size(model_path)
    inputs = _read_inputs(model_path)
    makers: dict[str, Callable[[np.dtype], np.ndarray]] = {
        "attention_mask": lambda dtype: np.ones((1, seq), dtype),
        "position_ids": lambda dtype: np.arange(seq, dtype=dtype)[None],
        "token_type_ids": lambda dtype: np.zeros((1, seq), dtype),
    }
    result = []
    for _ in range(samples):
        feed = {}
        for name, dtype in inputs:
            if name == "input_ids":
                # Ids 0..2 are pad/bos/eos in most configs; RoBERTa numbers positions around its padding id.
                feed[name] = rng.integers(3, vocab, size=(1, seq)).astype(dtype)
            elif name in makers:
                feed[name] = makers[name](dtype)
            else:
                raise ValueError(f"{model_path}: no feed for input '{name}'")
        result.append(feed)
    return result


def save_npz(model_path: Path, path: Path, samples: int, seq: int, seed: int) -> Path:
    """The .npz sqonnx takes with `--calib-data`: one array per model input, shape [samples, 1, seq]."""
    per_sample = feeds(model_path, samples, seq, seed)
    np.savez(path, **{name: np.stack([f[name] for f in per_sample]) for name in per_sample[0]})
    return path


def logits(model_path: Path, feeds: list[dict[str, np.ndarray]]) -> np.ndarray:
    """The model's first output (logits, or last_hidden_state for encoders) on CPU, samples concatenated
    along axis 0."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    first = session.get_outputs()[0].name
    return np.concatenate([session.run([first], feed)[0] for feed in feeds], axis=0)


def constant_weight_layers(path: Path) -> int:
    """MatMul/Gemm nodes whose second input is a 2-D float constant, seen through Identity/Constant and a
    Transpose (a tied LM head reads the embedding table transposed)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    constants = {init.name: list(init.dims) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            constants[node.output[0]] = list(node.attribute[0].t.dims)
    changed = True
    while changed:
        changed = False
        for node in graph.node:
            if node.op_type in ("Identity", "Transpose") and node.input[0] in constants \
                    and node.output[0] not in constants:
                constants[node.output[0]] = constants[node.input[0]][::-1 if node.op_type == "Transpose" else 1]
                changed = True
    return sum(1 for node in graph.node if node.op_type in ("MatMul", "Gemm") and len(node.input) > 1
               and len(constants.get(node.input[1], [])) == 2)



def main() -> None:
    """Build every family (or those named on the command line) and print how long each export took."""
    import sys
    import time

    total = time.perf_counter()
    for family in sys.argv[1:] or FAMILIES:
        start = time.perf_counter()
        path = build(family)
        size = sum(p.stat().st_size for p in path.parent.iterdir()) / 1e6
        print(f"{family:12s} {time.perf_counter() - start:6.1f} s  {size:5.2f} MB  {path}", flush=True)
    print(f"total {time.perf_counter() - total:.1f} s")



def _half(array: np.ndarray, dtype: ir.DataType) -> np.ndarray:
    """In `dtype`, within its finite range: an exporter writes the half type's own minimum where float32's was (an
    attention mask's -3.4e38 would be -inf in bfloat16, and 0 * -inf a NaN)."""
    info = np.finfo(dtype.numpy()) if dtype == ir.DataType.FLOAT16 else None
    low, high = (float(info.min), float(info.max)) if info is not None else (-3.38e38, 3.38e38)
    return np.clip(array, low, high).astype(dtype.numpy())


def to_half(source: Path, target: Path, dtype: ir.DataType) -> Path:
    """`source` with every float32 type, constant and Cast target made `dtype` (float16 or bfloat16), its json and
    text companions (config, tokenizer) copied beside: what an export in that type holds where it matters (an
    exporter that cannot write the type, or onnxruntime's CPU that cannot run it for the exporter)."""
    model = ir.load(source)
    graph = model.graph
    for value in graph.initializers.values():
        tensor = value.const_value
        if tensor is not None and tensor.dtype == ir.DataType.FLOAT:
            value.const_value = ir.tensor(_half(tensor.numpy(), dtype), name=value.name)
    for value in (*graph.inputs, *graph.outputs, *graph.initializers.values(),
                  *(out for node in graph for out in node.outputs)):
        if value.dtype == ir.DataType.FLOAT:
            value.type = ir.TensorType(dtype)
    for node in graph:
        if node.op_type == "Cast" and node.attributes.get_int("to", 0) == ir.DataType.FLOAT.value:
            node.attributes["to"] = ir.AttrInt64("to", dtype.value)
        attr = node.attributes.get("value")
        if attr is not None and attr.type == ir.AttributeType.TENSOR and attr.value.dtype == ir.DataType.FLOAT:
            node.attributes["value"] = ir.AttrTensor("value", ir.tensor(_half(attr.value.numpy(), dtype)))
    target.parent.mkdir(parents=True, exist_ok=True)
    for companion in source.parent.iterdir():
        if companion.suffix in (".json", ".txt"):
            shutil.copy(companion, target.parent / companion.name)
    ir.save(model, target)
    return target


if __name__ == "__main__":
    main()
