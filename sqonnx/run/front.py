"""The front end `quantize` and `inspect` share: the model as the passes will see it, and its samples.

Optimize (optional), normalize the graph, read the calibration samples, generate the decode chains' tokens
with the FP model, rotate the residual stream (deferred: weights turn when their block is read), cut the
graph into blocks. `inspect` thus describes the very graph `quantize` smooths.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import onnx_ir as ir

from sqonnx.calibrators import CalibrationFeeds, calibration_feeds
from sqonnx.calibrators.cache import CalibrationCache, data_identity, model_identity
from sqonnx.calibrators.data import cache_outputs, check_data
from sqonnx.config import Level, QuantizeConfig, tool_version
from sqonnx.errors import SqonnxError
from sqonnx.graph.layers import find_linear_layers
from sqonnx.graph.tensors import opset_version
from sqonnx.io.genai import companion_files
from sqonnx.io.load import load_model
from sqonnx.io.writer import PHASE_INPUT
from sqonnx.passes.opset import HALF_QDQ_OPSET, SetOpsetPass
from sqonnx.passes.prepare import prepare
from sqonnx.passes.rotate import RotationResult, rotate_model
from sqonnx.run.progress import Progress
from sqonnx.runtime.optimize import fuse_transformer_ops
from sqonnx.streaming.blocks import Partition, partition
from sqonnx.streaming.generate import generate_tokens, sample_text
from sqonnx.streaming.runner import Samples
from sqonnx.targets import rules_of

logger = logging.getLogger(__name__)

# The residual-stream rotation is random but fixed: the same model and options give the same bytes.
ROTATION_SEED = 0

# Calibration samples --alpha auto keeps back to compare whole models (a quarter of them at most).
ALPHA_SELECTION_SAMPLES = 8
# The quality check keeps its samples back from the statistics when there are at least this many (128 by default:
# 124 calibrate, 4 are compared).
CHECK_HOLD_BACK_FROM = 16

# The FP model writes text of its own for calibration, and decode chains are generated with every block's session
# kept open, when the model's weights fit in this (beyond, every token would read the weights again: the text is
# then pydoc alone, and the chains read the weights once a step).
GENERATE_IN_MEMORY_BYTES = 1 << 30


@dataclass
class Loaded:
    """The input as read (`read_input`), handed to the run, which takes `model` out of it: the run then holds the only
    reference, and a run that starts again unrotated frees the first model before it reads the second."""

    model: ir.Model | None
    external: bool  # its weights are in external data (the output's will be too)
    input_bytes: int
    companions: dict[str, bytes]  # an onnxruntime-genai folder's config and tokenizer, staged with the output


def read_input(model_path: Path, output_path: Path, config: QuantizeConfig) -> Loaded:
    """Read the model and refuse, with one line, what the asked quantization cannot take."""
    model = load_model(model_path)
    companions = companion_files(model_path, output_path)
    move_to_target_opset(model, config)
    check_quantizable(model, config)
    # A --decode-weights model keeps its weights in a data file whatever the input did: onnxruntime then holds each
    # branch's weights once instead of beside the parsed protobuf (SmolLM2's W8A8 generating 256 + 64 tokens: peak RSS
    # 389 MB from a data file, 865 MB from one .onnx).
    external = any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values()) or \
        config.decode_weights is not None
    return Loaded(model, external, _model_bytes(model_path, model), companions)


@dataclass
class Prepared:
    model: ir.Model
    partition: Partition
    samples: Samples
    feeds: CalibrationFeeds
    rotation: RotationResult
    quantized: set[str]
    fused: dict[str, int] = field(default_factory=dict)
    cache: CalibrationCache | None = None


def prepare_model(model: ir.Model, model_path: Path, config: QuantizeConfig, workdir: Path,
                  progress: Progress) -> Prepared:
    """The model as the passes will see it, and its samples (the held-back ones apart: `quantize` judges on them,
    and `inspect` calibrates on what `quantize` counts)."""
    check_data(config.calibration)
    cache = CalibrationCache.open(config.cache_dir, _cache_key(model_path, model, config)) \
        if config.cache_dir is not None else None
    fused: dict[str, int] = {}
    if config.optimize:
        with progress.phase("optimize"):
            source, fused = fuse_transformer_ops(model_path, workdir)
            model = load_model(source)
            move_to_target_opset(model, config)
    with progress.phase("load"):
        model = prepare(model)
        layers = find_linear_layers(model.graph)
        if not any(not config.is_excluded(layer.name) for layer in layers):
            raise SqonnxError(f"{model_path.name} has no MatMul/Gemm with a constant float weight to quantize"
                              + (" outside --exclude patterns" if layers else ""))
        # The FP model writes tokens (its own text, the decode chains') before it is rotated: the rotated weights are
        # computed on every read (deferred), and generating reads every block once per step. So this graph is cut
        # here and the rotated one (its norms folded, run-time rotations added) again below: two graphs, one cut each.
        whole = partition(model.graph, config.block_bytes)
        in_memory = whole.total_bytes <= GENERATE_IN_MEMORY_BYTES
        check = 0 if config.smooth_only else config.check_samples
        feeds = calibration_feeds(model.graph, model_path.parent, config.calibration, check, can_sample=in_memory)
    if feeds.sampling is not None:
        sampling = feeds.sampling
        found = cache.tokens("sampled") if cache is not None else None
        if found is None or len(found) != 1 or found[0].shape != (len(sampling.prompts), sampling.length):
            with progress.phase("sample text"):
                found = [sample_text(model, whole, sampling, workdir, keep_sessions=True)]
            if cache is not None:
                cache.save_tokens(found, "sampled")
        feeds = feeds.with_sampled(found[0])
    held_out, check = _held_out(feeds.count - feeds.other, config)
    chains = feeds.decode
    if chains:
        tokens = cache.tokens() if cache is not None else None
        if tokens is not None and len(tokens) == len(chains):
            chains = [chain.with_tokens(found) for chain, found in zip(chains, tokens, strict=True)]
        else:
            with progress.phase("decode tokens"):
                if not in_memory:
                    steps = max(chain.steps for chain in chains)
                    progress.note(f"decode chains: their tokens take {steps} passes over the "
                                  f"{whole.total_bytes / 1e9:.1f} GB of weights; --decode-steps 0 calibrates "
                                  "prefill only")
                chains = generate_tokens(model, whole, chains, workdir, in_memory)
            if cache is not None:
                cache.save_tokens([chain.forced for chain in chains if chain.forced is not None])
    with progress.phase("rotate"):
        rotation = _rotate(model, model_path, config)
    quantized = {layer.name for layer in find_linear_layers(model.graph)
                 if not config.is_excluded(layer.name)} - set(rotation.online)
    with progress.phase("load"):
        blocks = partition(model.graph, config.block_bytes)
    if blocks.reason and blocks.total_bytes > config.block_bytes:
        progress.note(f"the whole model is one block ({blocks.total_bytes / 1e6:.0f} MB at once): {blocks.reason}")
    samples = Samples(feeds, held_out, chains, check, feeds.other)
    return Prepared(model, blocks, samples, feeds, rotation, quantized, fused, cache)


def _held_out(count: int, config: QuantizeConfig) -> tuple[int, int]:
    """Samples kept back from the statistics (a quarter at most), and how many of them the quality check compares.

    --alpha auto judges whole models on samples the statistics have not seen (in-sample, the static ranges fit
    those very samples and the tightest α always wins); so does the quality check, from CHECK_HOLD_BACK_FROM
    samples on. Below that every sample counts for the statistics and the check compares the last calibration
    samples (it still catches a wrecked model, not a subtle one)."""
    if config.smooth_only:
        return 0, 0
    check = min(config.check_samples, count)
    if config.alpha_auto and config.smooth:
        return min(max(ALPHA_SELECTION_SAMPLES, check), count // 4), check
    return (min(check, count // 4) if count >= CHECK_HOLD_BACK_FROM else 0), check


def _cache_key(model_path: Path, model: ir.Model, config: QuantizeConfig) -> dict[str, str]:
    """What calibration statistics depend on (see sqonnx.calibrators.cache), named for the refusal message."""
    data_files = sorted({Path(v.const_value.path) for v in model.graph.initializers.values()
                         if isinstance(v.const_value, ir.ExternalTensor)})
    calibration = config.calibration
    return {
        "model": model_identity(model_path, data_files),
        "calibration data": f"{data_identity(calibration.data)} x{calibration.num_samples} len{calibration.seq_len} "
                            f"decode{calibration.decode_steps} own-text{calibration.own_text:g}",
        "rotation setting": f"rotate={config.rotate} smooth={config.smooth} smooth_only={config.smooth_only}",
        "block size": str(config.block_bytes),
        "held-back samples (--alpha auto, --check-samples)": str(_held_out(calibration.num_samples, config)[0]),
        "the check's second set (--eval-data, --check-samples)": (
            f"{data_identity(calibration.eval_data) if calibration.eval_data else 'own text'} x{config.check_samples}"),
        "--optimize setting": str(config.optimize),
        "Hessians (--weight-rounding gptq)": str(config.needs_hessians),
        "quantization options (--sequential)": repr(replace(config, cache_dir=None)) if config.sequential else "",
        "sqonnx version": tool_version(),
    }


def _rotate(model: ir.Model, model_path: Path, config: QuantizeConfig) -> RotationResult:
    """Rotate the residual stream where the graph allows it exactly (see passes/rotate.py). By default a graph
    that would need run-time rotations (Gemma 3's post-norms) is left alone; `--rotate` accepts them (they
    stay float)."""
    if config.rotate is False or (config.rotate is None and not config.smooth):
        return RotationResult(False, "--no-rotate" if config.rotate is False else "--no-smooth")
    return rotate_model(model, ROTATION_SEED, model_path.parent, online=config.rotate is True)


def move_to_target_opset(model: ir.Model, config: QuantizeConfig) -> None:
    """A GPU target's opset window: 19 at least where the model's half type is quantized in that type (Q/DQ took
    half types in 19), the target's maximum at most (TensorRT 10 reads 20, onnxruntime-genai writes 21). The graph
    is relabelled where every op means the same (passes.opset); else the refusal names the node."""
    if config.smooth_only:
        return
    rules = rules_of(config.target)
    opset = opset_version(model.graph)
    # the insert passes quantize a layer in its activation's type (a weight's where the graph leaves it untyped)
    types = {layer.activation.dtype or (layer.weight_value.const_value.dtype if layer.weight_value.const_value
                                        else None) for layer in find_linear_layers(model.graph)}
    half = bool(types & set(rules.half_qdq))
    if half and opset < 13:
        raise SqonnxError(f"the model uses opset {opset}; {rules.runtime} takes half-precision Q/DQ from opset "
                          f"{HALF_QDQ_OPSET}: convert it with onnx.version_converter.convert_version(model, "
                          f"{HALF_QDQ_OPSET}) first")
    wanted = opset
    if half and opset < HALF_QDQ_OPSET:
        wanted, why = HALF_QDQ_OPSET, (f"{rules.runtime} takes {'/'.join(t.name.lower() for t in rules.half_qdq)} "
                                       f"Q/DQ from opset {HALF_QDQ_OPSET}")
    elif rules.max_opset and opset > rules.max_opset:
        wanted, why = rules.max_opset, rules.opset_reason.format(max=rules.max_opset)
    if wanted != opset:
        SetOpsetPass(wanted, why)(model)
        logger.info("opset %d -> %d (%s)", opset, wanted, why)


QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "QLinearMatMul", "MatMulInteger",
                 "DynamicQuantizeLinear", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QGemm", "MatMulNBits"}


def check_quantizable(model: ir.Model, config: QuantizeConfig) -> None:
    """The loaded model can take the asked quantization: its opset, the target's limits, not quantized already."""
    opset = opset_version(model.graph)
    # Per-axis DequantizeLinear came in opset 13; DynamicQuantizeLinear and Round in 11.
    per_axis_dq = config.per_channel and not config.integer_form
    needed = max(13 if per_axis_dq else 10, 10 if config.level is Level.O3 else 11)
    if opset < needed and not config.smooth_only:
        hint = " (or --per-tensor, which needs 10)" if per_axis_dq and opset >= 10 and config.level is Level.O3 else ""
        raise SqonnxError(f"the model uses opset {opset}; {config.level.value} {config.format_used.value} "
                          f"quantization needs opset {needed} or newer: convert it with "
                          f"onnx.version_converter.convert_version(model, 17){hint}")
    rules = rules_of(config.target)
    if rules.max_opset and opset > rules.max_opset and not config.smooth_only:
        raise SqonnxError(f"the model uses opset {opset}; {rules.opset_reason.format(max=rules.max_opset)}: convert "
                          f"it with onnx.version_converter.convert_version(model, {rules.max_opset}) first")
    inputs = list(model.graph.inputs)
    if config.decode_weights is not None and not cache_outputs(inputs):
        raise SqonnxError("--decode-weights writes a decode stage for single-token runs through the key/value cache, "
                          "and the model has none (no past_key_values.* inputs): export it with past (optimum: --task "
                          "text-generation-with-past, or onnxruntime-genai's builder), or drop --decode-weights")
    if config.decode_weights is not None and PHASE_INPUT not in {v.name for v in inputs}:
        raise SqonnxError(f"--decode-weights tells prompt from decode by the token count of `{PHASE_INPUT}`, which the "
                          "model does not take (it reads embeddings?): drop --decode-weights")
    already = sorted({node.op_type for node in ir.traversal.RecursiveGraphIterator(model.graph)
                      if node.op_type in QUANTIZED_OPS})
    if already:
        raise SqonnxError(f"the model is already quantized (it has {', '.join(already)}); "
                          "pass the original float model")


def _model_bytes(path: Path, model: ir.Model) -> int:
    """The .onnx file plus every external data file its initializers point to."""
    data_files = {Path(v.const_value.path) for v in model.graph.initializers.values()
                  if isinstance(v.const_value, ir.ExternalTensor)}
    return path.stat().st_size + sum(f.stat().st_size for f in data_files if f.exists())
