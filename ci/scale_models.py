#!/usr/bin/env python
"""Llama-shaped decoders at real sizes (TinyLlama-1.1B, Llama-2-7B), written straight into ONNX for ci/scale.py.

Why not export them: no model hub is reachable from CI, and exporting a 7B model with optimum holds the
model in torch and again as a protobuf (tens of GB). This module writes what optimum would write, tensor by
tensor: each weight is drawn from a seeded generator in chunks of `CHUNK_ELEMENTS`, appended to one data
file and referenced from the graph as an onnx-ir `ExternalTensor`, so memory holds one chunk and the graph,
never the model (27 GB for Llama-2-7B in FP32). `onnx_ir.save` without `external_data` keeps those references.

The graph is, node for node and name for name, what optimum-onnx 0.1 (torch 2.13's TorchScript exporter,
transformers 4.57) writes for `LlamaForCausalLM`, task text-generation or text-generation-with-past: sqonnx's
matchers were written against those exports, and a benchmark is only worth its numbers if it meets what
makes real exports hard. That means the int64 shape arithmetic around every Reshape, the causal mask built
from `attention_mask` (Range/LessOrEqual/Gather/And/Expand), rotary tables computed from `position_ids`
(MatMul of inv_freq by positions, Cos/Sin) and applied with rotate_half (Slice/Neg/Concat), GQA's
Unsqueeze/Expand/Reshape of k and v (absent when kv_heads == heads, as transformers skips repeat_kv), the
RMSNorm chain with its Casts, SiLU as Sigmoid * x, and initializers named as the exporter names them (linear
weights are `onnx::MatMul_<n>`, [in, out]). Two attention forms:

- "sdpa" (default): transformers' default attention, so what `optimum-cli export onnx` writes for a checkpoint
  (SmolLM2 in models/): q and k^T each scaled by head_dim^-1/4, a boolean mask turned into 0/-inf per layer,
  Softmax guarded by IsNaN.
- "eager": what models/zoo.py exports: scores scaled by head_dim^-1/2, an additive 0/finfo.min mask built once.

FP16 is what the exporter writes for a model in float16 (verified on tiny exports): float16 weights,
activations, cache and logits; RMSNorm statistics stay in float32 (Cast to float, Cast back before the weight);
rotary tables in float32 (inv_freq rounded to float16 first, as `model.half()` does). The "sdpa" form in float16
carries the exporter's type promotion: the scores are cast to float32 to meet the float32 0/-inf mask, v is
cast to float32, so the attention output, o_proj (a float32 weight) and the residual stream from the first
attention on are float32, each down_proj output cast up before its Add; the "eager" form stays float16.

Weights are random but trained-like, so SmoothQuant has something to do: linear weights N(0, 1/in) (o_proj and
down_proj further by 1/sqrt(2 * layers), so the residual stream stays O(1) at depth), norm weights 1 + 0.05 N
with `OUTLIER_FRACTIONS` channels x`OUTLIER_SCALE` in every norm (the outlier channels of real LLMs) and those
rows x`READER_ROW_SCALE` in the linears that read a norm (the trick models/zoo.py uses), an embedding of small
N(0, 0.05) with the same channels larger. Each tensor has its own generator seeded by (seed, layer, name).

    python ci/scale_models.py --shape tinyllama --out /tmp/tinyllama            # 4.4 GB
    python ci/scale_models.py --shape llama2-7b --dtype float16 --with-past --out /tmp/llama2
    python ci/scale_models.py --shape custom --hidden 256 --intermediate 688 --layers 4 --heads 8 \\
        --kv-heads 2 --vocab 1000 --out /tmp/small
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import time
import zlib
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO, Literal

import numpy as np
import onnx_ir as ir

DType = Literal["float32", "float16"]
Attention = Literal["sdpa", "eager"]

OPSET = 18  # what optimum-onnx 0.1 exports Llama with
IR_VERSION = 8
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx_data"  # the name optimum gives a large export's external data

# Hidden channels that are large in every norm weight and small in the rows of the linears that read a norm.
OUTLIER_FRACTIONS = (0.07, 0.31, 0.58, 0.83)
OUTLIER_SCALE = 20.0
READER_ROW_SCALE = 0.1
EMBEDDING_STD = 0.05
EMBEDDING_OUTLIER_SCALE = 10.0
NORM_WEIGHT_STD = 0.05

CHUNK_ELEMENTS = 1 << 18  # a weight is drawn and written this many elements at a time (1 MB in FP32)
ALIGN_ABOVE = 1 << 20  # tensors larger than this start at a multiple of ALIGNMENT in the data file (mmap-able)
ALIGNMENT = 1 << 16

_INT64_MAX = np.iinfo(np.int64).max
_FLOAT, _INT64, _BOOL, _FLOAT16 = 1, 7, 9, 10  # TensorProto data types, as Cast's `to` spells them


@dataclass(frozen=True)
class LlamaShape:
    """The dimensions of a Llama decoder (transformers' LlamaConfig names in the comments)."""

    hidden: int  # hidden_size
    intermediate: int  # intermediate_size
    layers: int  # num_hidden_layers
    heads: int  # num_attention_heads
    kv_heads: int  # num_key_value_heads
    vocab: int  # vocab_size
    max_positions: int = 4096  # max_position_embeddings (config.json only: the rotary tables are computed)
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        for field_name in ("hidden", "intermediate", "layers", "heads", "kv_heads", "vocab"):
            if getattr(self, field_name) < 1:
                raise ValueError(f"LlamaShape.{field_name} must be at least 1, got {getattr(self, field_name)}")
        if self.hidden % self.heads or (self.hidden // self.heads) % 2:
            raise ValueError(f"hidden {self.hidden} must split into {self.heads} heads of an even size")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads {self.heads} must be a multiple of kv_heads {self.kv_heads}")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def groups(self) -> int:
        """Query heads per key/value head (repeat_kv's n_rep)."""
        return self.heads // self.kv_heads

    @property
    def parameters(self) -> int:
        kv = self.kv_heads * self.head_dim
        per_layer = 2 * self.hidden * (self.hidden + kv) + 3 * self.hidden * self.intermediate + 2 * self.hidden
        return self.layers * per_layer + 2 * self.vocab * self.hidden + self.hidden

    def outlier_channels(self) -> np.ndarray:
        """The hidden channels planted as outliers: the same in every layer."""
        return np.unique([int(f * self.hidden) for f in OUTLIER_FRACTIONS])


TINYLLAMA = LlamaShape(2048, 5632, 22, 32, 4, 32000, max_positions=2048)
LLAMA2_7B = LlamaShape(4096, 11008, 32, 32, 32, 32000)
SHAPES = {"tinyllama": TINYLLAMA, "llama2-7b": LLAMA2_7B}


def build_llama(path: Path, shape: LlamaShape, *, dtype: DType = "float32", with_past: bool = False, seed: int = 0,
                attention: Attention = "sdpa") -> Path:
    """Write a Llama decoder at `path` (an .onnx file; its weights go to `model.onnx_data` beside it, and a
    config.json as optimum saves one), with trained-like random weights drawn from `seed`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data_path = path.parent / (DATA_FILE if path.name == MODEL_FILE else f"{path.name}_data")
    with _DataFile(data_path) as data:
        graph = _LlamaWriter(shape, _Precision(dtype, attention), with_past, _Weights(data, shape, seed)).graph()
    model = ir.Model(graph, ir_version=IR_VERSION, producer_name="sqonnx ci/scale_models.py")
    ir.save(model, path)
    (path.parent / "config.json").write_text(json.dumps(_config(shape, dtype, with_past), indent=2) + "\n")
    return path


def feeds(shape: LlamaShape, samples: int, seq_len: int, seed: int, *, with_past: bool, dtype: DType = "float32",
          past_len: int = 0) -> dict[str, np.ndarray]:
    """Inputs for `samples` runs at batch 1, stacked on a leading sample axis (the .npz sqonnx's --calib-data
    takes): random token ids, an all-ones mask over past + new tokens, positions after the past. With past,
    the cache is empty ([samples, 1, kv_heads, 0, head_dim], a prefill) unless `past_len` > 0: then random
    N(0, 1) keys and values (sqonnx's .npz reader refuses arrays with a zero-sized axis)."""
    if samples < 1 or seq_len < 1 or past_len < 0 or (past_len and not with_past):
        raise ValueError(f"feeds: samples {samples} and seq_len {seq_len} must be >= 1, past_len {past_len} >= 0 "
                         "and only with with_past")
    rng = np.random.default_rng(seed)
    result = {
        "input_ids": rng.integers(0, shape.vocab, size=(samples, 1, seq_len), dtype=np.int64),
        "attention_mask": np.ones((samples, 1, past_len + seq_len), np.int64),
        "position_ids": np.broadcast_to(np.arange(past_len, past_len + seq_len, dtype=np.int64),
                                        (samples, 1, seq_len)).copy(),
    }
    if with_past:
        cache = (samples, 1, shape.kv_heads, past_len, shape.head_dim)
        for i in range(shape.layers):
            for kind in ("key", "value"):
                result[f"past_key_values.{i}.{kind}"] = rng.standard_normal(cache, dtype=np.float32).astype(dtype)
    return result


def _config(shape: LlamaShape, dtype: DType, with_past: bool) -> dict[str, object]:
    """config.json as transformers writes it for LlamaForCausalLM (the keys sqonnx and onnxruntime's
    optimizer read among them)."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": shape.hidden, "intermediate_size": shape.intermediate, "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads, "num_key_value_heads": shape.kv_heads, "head_dim": shape.head_dim,
        "vocab_size": shape.vocab, "max_position_embeddings": shape.max_positions, "rope_theta": shape.rope_theta,
        "rms_norm_eps": shape.rms_norm_eps, "rope_scaling": None, "attention_bias": False, "mlp_bias": False,
        "tie_word_embeddings": False, "torch_dtype": dtype, "use_cache": with_past,
        "bos_token_id": 1, "eos_token_id": 2,
    }


# --- weights -------------------------------------------------------------------------------------------------

class _DataFile:
    """One external data file, appended to: tensors larger than ALIGN_ABOVE start on ALIGNMENT boundaries."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: BinaryIO | None = None

    def __enter__(self) -> _DataFile:
        self._file = self.path.open("wb")
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._file is not None
        self._file.close()

    def append(self, blocks: Iterator[np.ndarray], nbytes: int) -> int:
        """Write `blocks` (`nbytes` in all) at the next offset; returns the offset."""
        assert self._file is not None
        offset = self._file.tell()
        if nbytes > ALIGN_ABOVE and offset % ALIGNMENT:
            self._file.write(b"\0" * (ALIGNMENT - offset % ALIGNMENT))
            offset = self._file.tell()
        for block in blocks:
            self._file.write(np.ascontiguousarray(block).data)
        written = self._file.tell() - offset
        if written != nbytes:
            raise AssertionError(f"wrote {written} bytes for a tensor of {nbytes}")
        return offset


class _Weights:
    """Trained-like random weights, each drawn in chunks from its own seeded generator and written straight to
    the data file; the graph gets Values whose `const_value` is an ExternalTensor pointing at those bytes."""

    def __init__(self, data: _DataFile, shape: LlamaShape, seed: int) -> None:
        self.data, self.shape, self.seed = data, shape, seed
        self.outliers = shape.outlier_channels()

    def _rng(self, key: str) -> np.random.Generator:
        return np.random.default_rng([self.seed, zlib.crc32(key.encode())])

    def _external(self, name: str, dims: tuple[int, ...], dtype: np.dtype,
                  blocks: Iterator[np.ndarray]) -> ir.Value:
        nbytes = int(np.prod(dims)) * dtype.itemsize
        offset = self.data.append(blocks, nbytes)
        ir_dtype = ir.DataType.from_numpy(dtype)
        tensor = ir.ExternalTensor(self.data.path.name, offset, nbytes, ir_dtype, shape=ir.Shape(dims), name=name,
                                   base_dir=self.data.path.parent)
        return ir.Value(name=name, type=ir.TensorType(ir_dtype), shape=ir.Shape(dims), const_value=tensor)

    def _gaussian(self, key: str, rows: int, cols: int, std: float, dtype: np.dtype,
                  row_scale: float = 1.0, col_scale: float = 1.0) -> Iterator[np.ndarray]:
        """N(0, std^2) [rows, cols] in row blocks; the outlier rows times `row_scale`, columns times `col_scale`."""
        rng = self._rng(key)
        step = max(1, CHUNK_ELEMENTS // cols)
        for start in range(0, rows, step):
            block = rng.standard_normal((min(step, rows - start), cols), dtype=np.float32)
            block *= np.float32(std)
            if row_scale != 1.0:
                local = self.outliers[(self.outliers >= start) & (self.outliers < start + len(block))] - start
                block[local] *= np.float32(row_scale)
            if col_scale != 1.0:
                block[:, self.outliers] *= np.float32(col_scale)
            yield block.astype(dtype, copy=False)

    def linear(self, name: str, key: str, rows: int, cols: int, dtype: np.dtype, *, reads_norm: bool,
               depth_scaled: bool = False) -> ir.Value:
        """A MatMul weight, [in, out] as the exporter stores torch's transposed Linear weight."""
        std = rows ** -0.5 / (np.sqrt(2.0 * self.shape.layers) if depth_scaled else 1.0)
        row_scale = READER_ROW_SCALE if reads_norm else 1.0
        return self._external(name, (rows, cols), dtype, self._gaussian(key, rows, cols, std, dtype, row_scale))

    def norm(self, name: str, dtype: np.dtype) -> ir.Value:
        rng = self._rng(name)
        weight = 1.0 + NORM_WEIGHT_STD * rng.standard_normal(self.shape.hidden, dtype=np.float32)
        weight[self.outliers] *= OUTLIER_SCALE
        return self._external(name, (self.shape.hidden,), dtype, iter([weight.astype(dtype)]))

    def embedding(self, name: str, dtype: np.dtype) -> ir.Value:
        shape = self.shape
        blocks = self._gaussian(name, shape.vocab, shape.hidden, EMBEDDING_STD, dtype,
                                col_scale=EMBEDDING_OUTLIER_SCALE)
        return self._external(name, (shape.vocab, shape.hidden), dtype, blocks)


# --- graph ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Precision:
    """Where each kind of tensor lives in float16 vs float32 (see the module docstring)."""

    dtype: DType
    attention: Attention

    @property
    def half(self) -> bool:
        return self.dtype == "float16"

    @property
    def array_dtype(self) -> np.dtype:
        return np.dtype(self.dtype)

    @property
    def to(self) -> int:
        """Cast's `to` for the activation type."""
        return _FLOAT16 if self.half else _FLOAT

    @property
    def promoted(self) -> bool:
        """sdpa in float16: the attention output, o_proj and the residual stream are float32."""
        return self.half and self.attention == "sdpa"


class _Emitter:
    """Appends nodes named as the TorchScript exporter names them: `{scope}/{Op}`, then `{scope}/{Op}_1`, ... per
    scope and op type, outputs `{node}_output_0`; constants it makes outside any module are `Constant_<n>` with
    outputs `onnx::<Consumer>_<n>`. Emitting in the exporter's order gives the exporter's names."""

    def __init__(self) -> None:
        self.nodes: list[ir.Node] = []
        self.scope = ""
        self._counts: Counter[tuple[str, str]] = Counter()
        self._anonymous = itertools.count(100)

    @contextlib.contextmanager
    def at(self, scope: str) -> Iterator[None]:
        outer, self.scope = self.scope, scope
        try:
            yield
        finally:
            self.scope = outer

    def op(self, op_type: str, *inputs: ir.Value, output: str | None = None, **attributes: object) -> ir.Value:
        count = self._counts[(self.scope, op_type)]
        self._counts[(self.scope, op_type)] += 1
        name = f"{self.scope}/{op_type}" + (f"_{count}" if count else "")
        value = ir.Value(name=output or f"{name}_output_0")
        self.nodes.append(ir.node(op_type, list(inputs), attributes, outputs=[value], name=name))  # type: ignore[arg-type]
        return value

    def const(self, value: float | Sequence[float], dtype: type | np.dtype = np.int64) -> ir.Value:
        """A scoped Constant: a scalar from a Python number, a 1-D tensor from a list."""
        return self.op("Constant", value=ir.tensor(np.array(value, dtype=dtype)))

    def anonymous_name(self, consumer: str) -> str:
        return f"onnx::{consumer}_{next(self._anonymous)}"

    def anonymous(self, array: np.ndarray, consumer: str) -> ir.Value:
        """A Constant outside any scope, as the exporter's symbolic helpers make them."""
        value = ir.Value(name=self.anonymous_name(consumer))
        self.nodes.append(ir.node("Constant", [], {"value": ir.tensor(array)}, outputs=[value],
                                  name=f"Constant_{next(self._anonymous)}"))
        return value

    def unsqueeze0(self, value: ir.Value) -> ir.Value:
        """Unsqueeze(value, [0]) with an anonymous axes constant (how the exporter unsqueezes sizes for a Concat)."""
        return self.op("Unsqueeze", value, self.anonymous(np.array([0], np.int64), "Unsqueeze"))

    def shape_at(self, value: ir.Value, axis: int) -> ir.Value:
        """Shape, Constant(axis), Gather: one dimension as an int64 scalar."""
        shape = self.op("Shape", value)
        return self.op("Gather", shape, self.const(axis), axis=0)

    def minus_one_to_one(self, shape: ir.Value) -> ir.Value:
        """The exporter's guard for Expand: Where(shape == -1, 1, shape)."""
        ones = self.op("ConstantOfShape", self.op("Shape", shape), value=ir.tensor(np.array([1], np.int64)))
        minus = self.op("Mul", ones, self.const(-1))
        return self.op("Where", self.op("Equal", shape, minus), ones, shape)


@dataclass
class _Mask:
    """The causal-and-padding mask: boolean [batch, 1, q, kv], and for eager its additive form."""

    boolean: ir.Value
    additive: ir.Value | None


class _LlamaWriter:
    """Emits optimum's LlamaForCausalLM graph in the exporter's node order, weights written as they come."""

    def __init__(self, shape: LlamaShape, precision: _Precision, with_past: bool, weights: _Weights) -> None:
        self.s, self.p, self.with_past, self.w = shape, precision, with_past, weights
        self.e = _Emitter()
        act = ir.DataType.FLOAT16 if precision.half else ir.DataType.FLOAT
        batch, seq, past = "batch_size", "sequence_length", "past_sequence_length"
        total = f"{past} + {seq}" if with_past else seq

        def value(name: str, dtype: ir.DataType, dims: list[int | str]) -> ir.Value:
            return ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(dims))

        self.inputs = [value("input_ids", ir.DataType.INT64, [batch, seq]),
                       value("attention_mask", ir.DataType.INT64, [batch, total]),
                       value("position_ids", ir.DataType.INT64, [batch, seq])]
        self.outputs = [value("logits", act, [batch, seq, shape.vocab])]
        self.past: list[tuple[ir.Value, ir.Value]] = []
        self.present: list[tuple[ir.Value, ir.Value]] = []
        if with_past:
            for i in range(shape.layers):
                pair = tuple(value(f"past_key_values.{i}.{k}", act, [batch, shape.kv_heads, past, shape.head_dim])
                             for k in ("key", "value"))
                self.past.append(pair)  # type: ignore[arg-type]
                self.inputs += pair
                out = tuple(value(f"present.{i}.{k}", act, [batch, shape.kv_heads, total, shape.head_dim])
                            for k in ("key", "value"))
                self.present.append(out)  # type: ignore[arg-type]
                self.outputs += out
        self.initializers: list[ir.Value] = []
        self._heads_rotary: tuple[ir.Value, ir.Value] | None = None  # cos, sin as [batch, 1, seq, head_dim]

    def graph(self) -> ir.Graph:
        e, w = self.e, self.w
        embed = self._keep(w.embedding("model.embed_tokens.weight", self.p.array_dtype))
        with e.at("/model/embed_tokens"):
            hidden = e.op("Gather", embed, self.inputs[0])
        mask = self._mask(hidden)
        cos, sin = self._rotary()
        for i in range(self.s.layers):
            hidden = self._layer(i, hidden, mask, cos, sin)
        normed, _ = self._norm("/model/norm", "model.norm.weight", hidden)
        lm_head = self._keep(w.linear(e.anonymous_name("MatMul"), "lm_head.weight", self.s.hidden, self.s.vocab,
                                      self.p.array_dtype, reads_norm=True))
        with e.at("/lm_head"):
            logits = e.op("MatMul", normed, lm_head, output="logits")
        outputs = [logits] + [v for pair in self.present for v in pair]
        for declared, produced in zip(self.outputs, outputs, strict=True):
            produced.type, produced.shape = declared.type, declared.shape
        return ir.Graph(self.inputs, outputs, nodes=e.nodes, initializers=self.initializers,
                        opset_imports={"": OPSET}, name="main_graph")

    def _keep(self, value: ir.Value) -> ir.Value:
        self.initializers.append(value)
        return value

    def _mask(self, hidden: ir.Value) -> _Mask:
        """transformers' create_causal_mask as exported: kv_idx <= q_idx (cache positions), And the padding mask
        gathered from `attention_mask`, Expanded to [batch, 1, q, kv]; eager adds Where(mask, 0, finfo.min)."""
        e = self.e
        with e.at("/model"):
            if self.with_past:
                past = e.shape_at(self.past[0][0], 2)
                seq = e.shape_at(hidden, 1)
                end = e.op("Add", past, seq)
                positions = e.op("Range", e.op("Cast", past, to=_INT64), e.op("Cast", end, to=_INT64), e.const(1))
            else:
                seq = e.shape_at(hidden, 1)
                start = e.const(0)
                positions = e.op("Range", start, e.op("Cast", seq, to=_INT64), e.const(1))
            mask_bool = e.op("Cast", self.inputs[1], to=_BOOL)
            if self.with_past:
                q_len = e.shape_at(positions, 0)
                kv_len = e.op("Add", past, q_len)
                batch = e.shape_at(hidden, 0)
            else:
                batch = e.shape_at(hidden, 0)
                q_len = e.shape_at(positions, 0)
                kv_len = seq
            q_idx = positions
            for axis in (0, 1, 3):
                q_idx = e.op("Unsqueeze", q_idx, e.const([axis]))
            batch_idx = self._arange(e.op("Cast", batch, to=_INT64))
            for axis in (1, 2, 3):
                batch_idx = e.op("Unsqueeze", batch_idx, e.const([axis]))
            kv_idx = self._arange(e.op("Cast", kv_len, to=_INT64))
            for axis in (0, 1, 2):
                kv_idx = e.op("Unsqueeze", kv_idx, e.const([axis]))
            true = e.op("ConstantOfShape", e.op("Constant", value=ir.tensor(np.zeros(0, np.int64))),
                        value=ir.tensor(np.array([True])))
            causal = e.op("Cast", e.op("LessOrEqual", kv_idx, q_idx), to=_BOOL)
            allowed = e.op("And", true, causal)
            mask_len = e.op("Gather", e.op("Shape", mask_bool), e.const([1]), axis=0)
            flat = e.op("Flatten", mask_bool, axis=2)
            index = e.op("Add", kv_idx, e.op("Mul", batch_idx, mask_len))
            padding = e.op("Gather", flat, index, axis=0)
            index_shape = e.op("Shape", index)
            padding = e.op("Reshape", padding, e.const([-1]), allowzero=0)
            padding = e.op("Reshape", padding, e.op("Concat", index_shape, axis=0), allowzero=0)
            allowed = e.op("And", allowed, e.op("Cast", padding, to=_BOOL))
            size = e.op("Concat", e.op("Unsqueeze", batch, e.const([0])), e.const([-1]),
                        e.op("Unsqueeze", q_len, e.const([0])), e.op("Unsqueeze", kv_len, e.const([0])), axis=0)
            size = e.op("Reshape", size, e.const([-1]), allowzero=0)
            boolean = e.op("Expand", allowed, e.minus_one_to_one(size))
            if self.p.attention == "sdpa":
                return _Mask(boolean, None)
            dtype = self.p.array_dtype
            return _Mask(boolean, e.op("Where", boolean, e.const(0.0, dtype), e.const(np.finfo(dtype).min, dtype)))

    def _arange(self, end: ir.Value) -> ir.Value:
        return self.e.op("Range", self.e.const(0), end, self.e.const(1))

    def _rotary(self) -> tuple[ir.Value, ir.Value]:
        """LlamaRotaryEmbedding as exported: inv_freq [1, d/2, 1] expanded over the batch, MatMul by positions,
        Concat(freqs, freqs), Cos/Sin times attention_scaling (1.0), cast to the activation type."""
        e, s = self.e, self.s
        exponents = np.arange(0, s.head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(s.head_dim)
        inv_freq = (np.float32(1.0) / np.power(np.float32(s.rope_theta), exponents)).astype(np.float32)
        if self.p.half:  # model.half() rounds the buffer; the forward casts it back with .float()
            inv_freq = inv_freq.astype(np.float16).astype(np.float32)
        inv = e.anonymous(inv_freq[None, :, None], "Expand")
        position_ids = self.inputs[2]
        with e.at("/model/rotary_emb"):
            batch = e.shape_at(position_ids, 0)
            size = e.op("Concat", e.op("Unsqueeze", batch, e.const([0])), e.const([-1]), e.const([1]), axis=0)
            size = e.op("Reshape", size, e.const([-1]), allowzero=0)
            inv = e.op("Cast", e.op("Expand", inv, e.minus_one_to_one(size)), to=_FLOAT)
            positions = e.op("Cast", e.op("Unsqueeze", position_ids, e.const([1])), to=_FLOAT)
            freqs = e.op("MatMul", e.op("Cast", inv, to=_FLOAT), e.op("Cast", positions, to=_FLOAT))
            freqs = e.op("Transpose", freqs, perm=[0, 2, 1])
            angles = e.op("Concat", freqs, freqs, axis=-1)
            cos = e.op("Mul", e.op("Cos", angles), e.const(1.0, np.float32))
            sin = e.op("Mul", e.op("Sin", angles), e.const(1.0, np.float32))
            return e.op("Cast", cos, to=self.p.to), e.op("Cast", sin, to=self.p.to)

    def _norm(self, scope: str, weight_name: str, hidden: ir.Value) -> tuple[ir.Value, ir.Value]:
        """LlamaRMSNorm: x.float(), Pow 2, ReduceMean(-1), + eps, Sqrt, 1 / ., x * ., cast back, weight * .
        Returns the output and the float32 input (the tracer's residual in an FP32 model)."""
        e = self.e
        weight = self._keep(self.w.norm(weight_name, self.p.array_dtype))
        with e.at(scope):
            x = e.op("Cast", hidden, to=_FLOAT)
            mean = e.op("ReduceMean", e.op("Pow", x, e.const(2.0, np.float32)), e.const([-1]), keepdims=1)
            std = e.op("Sqrt", e.op("Add", mean, e.const(self.s.rms_norm_eps, np.float32)))
            normed = e.op("Mul", x, e.op("Div", e.const(1.0, np.float32), std))
            return e.op("Mul", weight, e.op("Cast", normed, to=self.p.to)), x

    def _residual(self, stream: ir.Value, norm_input: ir.Value, update: ir.Value, *, stream_half: bool,
                  update_half: bool) -> ir.Value:
        """The residual Add. FP32: the tracer reads the norm's (no-op) Cast as the residual; float16: the stream
        itself, and where sdpa's promotion made one side float32, the float16 side is cast up."""
        e = self.e
        if not self.p.half:
            return e.op("Add", norm_input, update)
        if stream_half and not update_half:
            stream = e.op("Cast", stream, to=_FLOAT)
        elif update_half and not stream_half:
            update = e.op("Cast", update, to=_FLOAT)
        return e.op("Add", stream, update)

    def _layer(self, i: int, hidden: ir.Value, mask: _Mask, cos: ir.Value, sin: ir.Value) -> ir.Value:
        e = self.e
        scope = f"/model/layers.{i}"
        normed, norm_input = self._norm(f"{scope}/input_layernorm", f"model.layers.{i}.input_layernorm.weight", hidden)
        attended = self._attention(i, normed, mask, cos, sin)
        # float16 sdpa: the stream is float32 from the first attention's Add on, o_proj's output always.
        promoted = self.p.promoted
        with e.at(scope):
            hidden = self._residual(hidden, norm_input, attended, stream_half=not promoted or i == 0,
                                    update_half=not promoted)
        normed, norm_input = self._norm(f"{scope}/post_attention_layernorm",
                                        f"model.layers.{i}.post_attention_layernorm.weight", hidden)
        mlp = self._mlp(i, normed)
        with e.at(scope):
            return self._residual(hidden, norm_input, mlp, stream_half=not promoted, update_half=True)

    def _linear(self, scope: str, x: ir.Value, key: str, rows: int, cols: int, *, reads_norm: bool,
                depth_scaled: bool = False, dtype: np.dtype | None = None) -> ir.Value:
        weight = self._keep(self.w.linear(self.e.anonymous_name("MatMul"), key, rows, cols,
                                          dtype if dtype is not None else self.p.array_dtype, reads_norm=reads_norm,
                                          depth_scaled=depth_scaled))
        with self.e.at(scope):
            return self.e.op("MatMul", x, weight)

    def _mlp(self, i: int, x: ir.Value) -> ir.Value:
        """down_proj(silu(gate_proj(x)) * up_proj(x)), SiLU as x * Sigmoid(x)."""
        e, s = self.e, self.s
        scope, key = f"/model/layers.{i}/mlp", f"model.layers.{i}.mlp"
        gate = self._linear(f"{scope}/gate_proj", x, f"{key}.gate_proj.weight", s.hidden, s.intermediate,
                            reads_norm=True)
        with e.at(f"{scope}/act_fn"):
            act = e.op("Mul", gate, e.op("Sigmoid", gate))
        up = self._linear(f"{scope}/up_proj", x, f"{key}.up_proj.weight", s.hidden, s.intermediate, reads_norm=True)
        with e.at(scope):
            product = e.op("Mul", act, up)
        return self._linear(f"{scope}/down_proj", product, f"{key}.down_proj.weight", s.intermediate, s.hidden,
                            reads_norm=False, depth_scaled=True)

    def _heads(self, x: ir.Value, size: ir.Value) -> ir.Value:
        """[b, s, n*d] -> [b, n, s, d]."""
        return self.e.op("Transpose", self.e.op("Reshape", x, size, allowzero=0), perm=[0, 2, 1, 3])

    def _rotate(self, x: ir.Value, cos: ir.Value, sin: ir.Value) -> ir.Value:
        """x * cos + rotate_half(x) * sin, rotate_half = Concat(-x[..., d/2:], x[..., :d/2])."""
        e = self.e
        scaled = e.op("Mul", x, cos)
        half = e.op("Cast", e.op("Cast", e.op("Div", e.shape_at(x, 3), e.const(2)), to=_INT64), to=_INT64)
        axes, starts = e.const([3]), e.const([0])
        first = e.op("Slice", x, starts, e.op("Unsqueeze", half, e.const([0])), axes, e.const([1]))
        axes = e.const([3])
        second = e.op("Slice", x, e.op("Unsqueeze", half, e.const([0])), e.const([_INT64_MAX]), axes, e.const([1]))
        rotated = e.op("Concat", e.op("Neg", second), first, axis=-1)
        return e.op("Add", scaled, e.op("Mul", rotated, sin))

    def _repeat_kv(self, x: ir.Value) -> ir.Value:
        """repeat_kv as exported: [b, kv, s, d], Unsqueeze(2), Expand to [b, kv, n_rep, s, d], Reshape to
        [b, kv * n_rep, s, d]."""
        e, groups = self.e, self.s.groups
        batch, kv, seq, dim = (e.shape_at(x, axis) for axis in range(4))
        expanded = e.op("Unsqueeze", x, e.const([2]))
        size = e.op("Concat", e.op("Unsqueeze", batch, e.const([0])), e.op("Unsqueeze", kv, e.const([0])),
                    e.const([groups]), e.op("Unsqueeze", seq, e.const([0])), e.op("Unsqueeze", dim, e.const([0])),
                    axis=0)
        size = e.op("Reshape", size, e.const([-1]), allowzero=0)
        expanded = e.op("Expand", expanded, e.minus_one_to_one(size))
        heads = e.op("Mul", kv, e.const(groups))
        size = e.op("Concat", e.unsqueeze0(batch), e.unsqueeze0(heads), e.unsqueeze0(seq), e.unsqueeze0(dim), axis=0)
        return e.op("Reshape", expanded, size, allowzero=0)

    def _mask_slice(self, mask: ir.Value, keys: ir.Value) -> ir.Value:
        """attention_mask[:, :, :, :key_len]."""
        e = self.e
        key_len = e.shape_at(keys, 2)
        axes, starts = e.const([3]), e.const([0])
        return e.op("Slice", mask, starts, e.op("Unsqueeze", key_len, e.const([0])), axes, e.const([1]))

    def _attention(self, i: int, x: ir.Value, mask: _Mask, cos: ir.Value, sin: ir.Value) -> ir.Value:
        e, s, p = self.e, self.s, self.p
        scope, key = f"/model/layers.{i}/self_attn", f"model.layers.{i}.self_attn"
        kv_width = s.kv_heads * s.head_dim
        with e.at(scope):
            batch, seq = e.shape_at(x, 0), e.shape_at(x, 1)
        q = self._linear(f"{scope}/q_proj", x, f"{key}.q_proj.weight", s.hidden, s.hidden, reads_norm=True)
        with e.at(scope):
            sizes = [e.op("Concat", e.unsqueeze0(batch), e.unsqueeze0(seq), e.const([-1]), e.const([s.head_dim]),
                          axis=0) for _ in range(3)]
            q = self._heads(q, sizes[0])
        k = self._linear(f"{scope}/k_proj", x, f"{key}.k_proj.weight", s.hidden, kv_width, reads_norm=True)
        with e.at(scope):
            k = self._heads(k, sizes[1])
        v = self._linear(f"{scope}/v_proj", x, f"{key}.v_proj.weight", s.hidden, kv_width, reads_norm=True)
        with e.at(scope):
            v = self._heads(v, sizes[2])
            if self._heads_rotary is None:  # the exporter's CSE leaves one Unsqueeze, in the first layer
                self._heads_rotary = (e.op("Unsqueeze", cos, e.const([1])), e.op("Unsqueeze", sin, e.const([1])))
            cos_h, sin_h = self._heads_rotary
            q = self._rotate(q, cos_h, sin_h)
            k = self._rotate(k, cos_h, sin_h)
            if self.with_past:
                past_k, past_v = self.past[i]
                present_k, present_v = self.present[i]
                k = e.op("Concat", past_k, k, axis=-2, output=str(present_k.name))
                v = e.op("Concat", past_v, v, axis=-2, output=str(present_v.name))
            if s.groups > 1:
                k, v = self._repeat_kv(k), self._repeat_kv(v)
            probs = self._sdpa(q, k, mask) if p.attention == "sdpa" else self._eager(q, k, mask)
            if p.promoted:
                v = e.op("Cast", v, to=_FLOAT)
            out = e.op("Transpose", e.op("MatMul", probs, v), perm=[0, 2, 1, 3])
            size = e.op("Concat", e.unsqueeze0(batch), e.unsqueeze0(seq), e.const([-1]), axis=0)
            out = e.op("Reshape", out, size, allowzero=0)
        o_dtype = np.dtype(np.float32) if p.promoted else p.array_dtype
        return self._linear(f"{scope}/o_proj", out, f"{key}.o_proj.weight", s.hidden, s.hidden, reads_norm=False,
                            depth_scaled=True, dtype=o_dtype)

    def _eager(self, q: ir.Value, k: ir.Value, mask: _Mask) -> ir.Value:
        """softmax(q k^T * d^-1/2 + mask) in the activation type, then the float32 round trip of
        softmax(..., dtype=float32).to(q.dtype)."""
        e, p = self.e, self.p
        assert mask.additive is not None
        scores = e.op("MatMul", q, e.op("Transpose", k, perm=[0, 1, 3, 2]))
        scores = e.op("Mul", scores, e.const(self.s.head_dim ** -0.5, p.array_dtype))
        scores = e.op("Add", scores, self._mask_slice(mask.additive, k))
        probs = e.op("Cast", e.op("Softmax", scores, axis=-1), to=_FLOAT)
        return e.op("Cast", probs, to=p.to)

    def _sdpa(self, q: ir.Value, k: ir.Value, mask: _Mask) -> ir.Value:
        """torch's scaled_dot_product_attention symbolic: (q * sqrt(scale)) (k^T * sqrt(scale)) + Where(mask, 0,
        -inf), Softmax, NaN (fully masked rows) -> 0. In float16 the scores are promoted to meet the float32 mask."""
        e, p = self.e, self.p
        allowed = self._mask_slice(mask.boolean, k)
        keys = e.op("Transpose", k, perm=[0, 1, 3, 2])
        root_scale = np.sqrt(np.float32(self.s.head_dim ** -0.5))
        q = e.op("Mul", q, e.const(root_scale, p.array_dtype))
        scores = e.op("MatMul", q, e.op("Mul", keys, e.const(root_scale, p.array_dtype)))
        bias = e.op("Where", allowed, e.const([0.0], np.float32), e.const([-np.inf], np.float32))
        if p.promoted:
            scores = e.op("Cast", scores, to=_FLOAT)
        probs = e.op("Softmax", e.op("Add", scores, bias), axis=-1)
        return e.op("Where", e.op("IsNaN", probs), e.const([0.0], np.float32), probs)


# --- command line --------------------------------------------------------------------------------------------

def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=[*SHAPES, "custom"], default="tinyllama")
    for name in ("hidden", "intermediate", "layers", "heads", "kv-heads", "vocab"):
        parser.add_argument(f"--{name}", type=int, help="with --shape custom")
    parser.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    parser.add_argument("--attention", choices=["sdpa", "eager"], default="sdpa")
    parser.add_argument("--with-past", action="store_true", help="text-generation-with-past: key/value cache")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="folder for model.onnx, model.onnx_data, config.json")
    return parser.parse_args(argv)


def _shape(args: argparse.Namespace) -> LlamaShape:
    if args.shape != "custom":
        return SHAPES[args.shape]
    dims = {name: getattr(args, name) for name in ("hidden", "intermediate", "layers", "heads", "kv_heads", "vocab")}
    missing = [f"--{name.replace('_', '-')}" for name, dim in dims.items() if dim is None]
    if missing:
        raise SystemExit(f"error: --shape custom needs {', '.join(missing)}")
    return LlamaShape(**dims)


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    shape = _shape(args)
    start = time.perf_counter()
    path = build_llama(args.out / MODEL_FILE, shape, dtype=args.dtype, with_past=args.with_past, seed=args.seed,
                       attention=args.attention)
    size = sum(p.stat().st_size for p in path.parent.iterdir() if p.is_file())
    print(f"{path}: {shape.parameters / 1e6:,.1f} M parameters, {size / 1e6:,.1f} MB on disk, "
          f"{time.perf_counter() - start:.1f} s; {args.dtype}, {args.attention}"
          f"{', with past' if args.with_past else ''}, {json.dumps(asdict(shape))}")


if __name__ == "__main__":
    main()
