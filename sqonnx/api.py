"""`sqonnx.quantize`: the whole pipeline, calibrate -> smooth -> quantize -> clean up -> save -> check.

Each step is a pass or a pure function; this module only wires them and builds the report.
"""

from __future__ import annotations

import itertools
import json
import logging
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from sqonnx.calibrators import ActivationStats, calibration_feeds
from sqonnx.config import Level, QuantizeConfig
from sqonnx.errors import SqonnxError
from sqonnx.genai import companion_files
from sqonnx.graph import find_linear_layers, load_model
from sqonnx.keep_float import KeepFloatTrial, choose_float_layers, least_loss, rank_by_sensitivity
from sqonnx.kernels import KernelCheck, inspect_cpu_kernels
from sqonnx.optimize import fuse_transformer_ops
from sqonnx.output import check_output_path, save_atomically
from sqonnx.passes.insert_integer_matmul import InsertIntegerMatMulPass
from sqonnx.passes.insert_qdq import InsertQDQPass, LayerQuantization
from sqonnx.passes.prepare import load_prepared, prepare
from sqonnx.passes.rotate import RotationResult, rotate_model
from sqonnx.passes.smooth import GroupResult, SmoothPass, smoothing_statistics
from sqonnx.passes.smoothing_groups import find_smoothing_groups
from sqonnx.passes.transposed import RestoreTransposedCopiesPass
from sqonnx.report import LayerReport, QuantizeReport
from sqonnx.search import AlphaSearch, choose_level, static_range
from sqonnx.target import INT16_MAX, Target, full_range_is_safe, resolve, worst_int16_pair_in_graph

logger = logging.getLogger(__name__)

# Activation rows kept from calibration for the α search and clipping (float16: 512 x 1536 x 2 bytes =
# 1.5 MB for SmolLM2's widest activation, 110 MB over its 120 activations).
KEPT_ROWS = 512

QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "QLinearMatMul", "MatMulInteger",
                 "DynamicQuantizeLinear", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QGemm"}


def quantize(model_path: str | Path, output_path: str | Path | None = None,
             config: QuantizeConfig | None = None, *, progress: bool = False) -> QuantizeReport:
    """Quantize `model_path` to W8A8 SmoothQuant and save it at `output_path` (default `<stem>.int8.onnx`)."""
    with tempfile.TemporaryDirectory(prefix="sqonnx-work-") as workdir:
        return _quantize(Path(model_path), output_path, config or QuantizeConfig(), progress, Path(workdir))


def _quantize(model_path: Path, output_path: str | Path | None, config: QuantizeConfig, progress: bool,
              workdir: Path) -> QuantizeReport:
    started = time.perf_counter()
    output_path = Path(output_path) if output_path is not None else model_path.with_suffix(".int8.onnx")
    model = load_model(model_path)
    check_output_path(model_path, output_path)
    companions = companion_files(model_path, output_path)  # an onnxruntime-genai folder's config and tokenizer
    graph = model.graph
    _check_quantizable(model, config)
    input_bytes = _model_bytes(model_path, model)
    external_data = any(isinstance(v.const_value, ir.ExternalTensor) for v in graph.initializers.values())
    # Every build reads a memory-mapped copy: the optimizer's output, a staged copy with external data
    # (the input has its weights inline), or the input itself.
    fused: dict[str, int] = {}
    if config.optimize:
        source, fused = fuse_transformer_ops(model_path, workdir)
    elif not external_data:
        source = _stage_with_external_data(model, workdir)
    else:
        source = model_path
    model = load_prepared(source) if source != model_path else prepare(model)
    rotation, model, source = _rotate(model, source, model_path, config, workdir)
    graph = model.graph

    layers = find_linear_layers(graph)
    quantized = {layer.name for layer in layers if not config.is_excluded(layer.name)} - set(rotation.online)
    if not quantized:
        raise SqonnxError(f"{model_path.name} has no MatMul/Gemm with a constant float weight to quantize"
                          + (" outside --exclude patterns" if layers else ""))
    feeds = calibration_feeds(graph, model_path.parent, config.calibration)
    # --alpha auto judges whole models on samples the statistics have not seen (in-sample, the static
    # ranges fit those very samples and the tightest α always wins).
    held_out = min(ALPHA_SELECTION_SAMPLES, feeds.count // 4) if config.alpha_auto and config.smooth else 0
    calibrate = _First(feeds, feeds.count - held_out)
    # Decode chains (a with-past decoder's single tokens) count in the statistics only, after the samples.
    stats = smoothing_statistics(model, itertools.chain(calibrate, feeds.decode),
                                 feeds.count - held_out + len(feeds.decode), quantized,
                                 KEPT_ROWS if config.needs_rows else 0, progress)
    del model, graph  # each build below starts from a fresh, memory-mapped copy

    requested, alpha_trials = config, dict[str, float]()
    if held_out and not config.smooth_only:
        selection = list(itertools.islice(iter(feeds), feeds.count - held_out, feeds.count))
        config, alpha_trials = _alpha_that_never_loses(config, source, stats, quantized, selection, workdir)

    def build(float_layers: frozenset[str]) -> Built:
        return _build(load_prepared(source), config, stats, quantized - float_layers)

    built = build(frozenset())
    trials: list[KeepFloatTrial] = []
    if config.keep_float_budget is not None:
        ranking = rank_by_sensitivity(load_prepared(source), built.layer_reports, stats, config)
        chosen, trials = choose_float_layers(build, source, feeds, ranking, config.keep_float_budget, workdir)
        if chosen:
            built = build(chosen)
    model, graph, layer_reports, plan = built.model, built.model.graph, built.layer_reports, built.plan
    worst_pair = worst_int16_pair_in_graph(graph)
    if worst_pair > INT16_MAX and not full_range_is_safe(config.target):
        raise AssertionError(f"internal error: weights of a {config.target.value} model can overflow int16")
    settings = _settings(requested, worst_pair)
    settings["rotation"] = rotation.summary()
    if alpha_trials:
        kept = "per group" if config.alpha_auto else config.alpha
        settings["alpha"] = f"{settings['alpha']}: chose {kept} (output error on calibration samples: " + \
            ", ".join(f"{key} {loss:.4f}" for key, loss in alpha_trials.items()) + ")"
    if config.optimize:
        settings["optimize"] = ", ".join(f"{n} {op}" for op, n in fused.items()) or "nothing fused"
    if trials:
        settings["keep_float"] = [asdict(t) for t in trials]
    model.metadata_props.update(_metadata(settings, feeds.count, len(plan), sum(r.scale_min is not None
                                                                                for r in layer_reports)))
    if trials:
        model.metadata_props["sqonnx.float_layers"] = json.dumps(trials[-1].float_layers)
    if config.level_auto:
        model.metadata_props["sqonnx.level_per_layer"] = json.dumps(
            {r.name: r.level for r in layer_reports if r.quantized and r.level != Level.O3.value},
            separators=(",", ":"))
    if config.alpha_auto and config.smooth:
        model.metadata_props["sqonnx.alpha_per_layer"] = json.dumps(
            {r.name: r.alpha for r in layer_reports if r.quantized and r.alpha is not None}, separators=(",", ":"))

    kernels: list[KernelCheck] = []

    def validate(staged: Path) -> None:
        if config.verify_fusion and not config.smooth_only:
            kernels.append(inspect_cpu_kernels(staged))

    written = save_atomically(model, output_path, validate, external_data=external_data, companions=companions)
    report = QuantizeReport(
        input_path=str(model_path), output_path=str(output_path), settings=settings,
        calibration=feeds.description, layers=layer_reports, kernels=kernels[0] if kernels else None,
        input_bytes=input_bytes, output_bytes=written, seconds=time.perf_counter() - started)
    if report.kernels is not None and report.kernels.unfused:
        logger.warning("onnxruntime left %d quantized layers unfused (float MatMul after DequantizeLinear): %s",
                       len(report.kernels.unfused), ", ".join(report.kernels.unfused[:5]))
    return report


# The residual-stream rotation is random but fixed: the same model and options give the same bytes.
ROTATION_SEED = 0

# Calibration samples --alpha auto keeps back to compare whole models (a quarter of them at most).
ALPHA_SELECTION_SAMPLES = 8

# Single α values --alpha auto's per-group choice must beat on the whole model (within --alpha-range).
UNIFORM_ALPHAS = (0.25, 0.5, 0.75)


def _alpha_that_never_loses(config: QuantizeConfig, source: Path, stats: ActivationStats, quantized: set[str],
                            feeds: Iterable[dict[str, np.ndarray]],
                            workdir: Path) -> tuple[QuantizeConfig, dict[str, float]]:
    """--alpha auto: the per-group search, or the single α that gives a lower quality loss on calibration
    samples (a Gemma-3-style model ended at logits error 0.286 with per-group α against 0.215 at α 0.5)."""
    low, high = config.alpha_range
    candidates: dict[str, QuantizeConfig] = {"per group": config}
    for alpha in UNIFORM_ALPHAS:
        if low <= alpha <= high:
            candidates[str(alpha)] = replace(config, alpha=alpha)
    def build(candidate: QuantizeConfig) -> Callable[[], Built]:
        return lambda: _build(load_prepared(source), candidate, stats, quantized)

    best, losses = least_loss({key: build(c) for key, c in candidates.items()}, source, feeds, workdir)
    logger.info("--alpha auto: %s", ", ".join(f"{k} {v:.4f}" for k, v in losses.items()))
    return candidates[best], losses


@dataclass
class Built:
    """A smoothed and quantized model in memory, before it is saved."""

    model: ir.Model
    layer_reports: list[LayerReport]
    plan: list[LayerQuantization]


def _build(model: ir.Model, config: QuantizeConfig, stats: ActivationStats, quantized: set[str]) -> Built:
    """Smooth and quantize `model` (a fresh, prepared copy) with calibration statistics already collected."""
    graph = model.graph
    channel_max = stats.channel_max
    scheme = AlphaSearch(stats.rows, config.alpha_grid, config.level, config.weight_qmax, config.per_channel,
                         config.calib_method)
    if config.smooth:
        alpha = 0.0 if config.alpha_auto else float(config.alpha)
        # --smooth-only: the quantizer that takes over is not ours to judge; every exact fold is made.
        smooth = SmoothPass(stats, quantized, alpha, config.unabsorbed, scheme if config.alpha_auto else None,
                            None if config.smooth_only else scheme)
        smooth(model)
        results = smooth.results
    else:
        results = [GroupResult(g, None, "", "not smoothed: --no-smooth") for g in find_smoothing_groups(graph)]

    plan: list[LayerQuantization] = []
    layer_reports: list[LayerReport] = []
    for result in results:
        group = result.group
        act_max = channel_max.get(str(group.activation.name))
        rows = stats.rows.get(str(group.activation.name))
        static_max, level, why = 0.0, config.level, ""
        if act_max is not None and any(layer.name in quantized for layer in group.layers):
            scales = result.scales if result.scales is not None else np.ones_like(act_max)
            smoothed_rows = None if rows is None else rows.astype(np.float32) / scales
            static_max = static_range(config.calib_method, act_max / scales, smoothed_rows)
            if config.level_auto and smoothed_rows is not None:
                level, static_error, token_error = choose_level(
                    smoothed_rows, act_max / scales, [(ly.weight, ly.in_axis) for ly in group.layers], scheme)
                why = f"O3 error {static_error:.2g} vs per-token {token_error:.2g} on calibration rows"
        for layer in group.layers:
            is_quantized = layer.name in quantized and not config.smooth_only
            layer_reports.append(_layer_report(layer.name, result, act_max, is_quantized, static_max,
                                               level.value if is_quantized else "", why if is_quantized else ""))
            if is_quantized:
                plan.append(LayerQuantization(layer, static_max, level))
    opset = graph.opset_imports.get("", graph.opset_imports.get("ai.onnx", 0))
    # O1 has no Q/DQ spelling: its layers always get integer ops, the others the configured form.
    integer = [item for item in plan if config.integer_form or item.level is Level.O1]
    InsertIntegerMatMulPass(integer, config.weight_qmax, config.per_channel, config.level, opset)(model)
    InsertQDQPass([item for item in plan if not (config.integer_form or item.level is Level.O1)],
                  config.weight_qmax, config.per_channel)(model)
    ir.passes.Sequential(
        RestoreTransposedCopiesPass(),
        common_passes.RemoveUnusedNodesPass(),
        common_passes.TopologicalSortPass(),
    )(model)
    return Built(model, layer_reports, plan)


class _First:
    """The first `count` samples of a re-iterable feed source, itself re-iterable."""

    def __init__(self, feeds: Iterable[dict[str, np.ndarray]], count: int) -> None:
        self.feeds, self.count = feeds, count

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return itertools.islice(iter(self.feeds), self.count)


def _rotate(model: ir.Model, source: Path, model_path: Path, config: QuantizeConfig,
            workdir: Path) -> tuple[RotationResult, ir.Model, Path]:
    """Rotate the residual stream where the graph allows it exactly (see passes/rotate.py); the rotated
    model becomes the source every build reads. By default a graph that would need run-time rotations
    (Gemma 3's post-norms) is left alone; `--rotate` accepts them (they stay float)."""
    if config.rotate is False or (config.rotate is None and not config.smooth):
        return RotationResult(False, "--no-rotate" if config.rotate is False else "--no-smooth"), model, source
    rotation = rotate_model(model, ROTATION_SEED, model_path.parent)
    if rotation.rotated and rotation.online and config.rotate is None:
        why = (f"it would need {len(rotation.online)} run-time rotations after post-norms; pass --rotate to "
               "accept them")
        return RotationResult(False, why), load_prepared(source), source
    if not rotation.rotated:
        return rotation, model, source
    rotated = _stage_with_external_data(model, workdir, "rotated.onnx")
    return rotation, load_prepared(rotated), rotated


def _stage_with_external_data(model: ir.Model, workdir: Path, name: str = "model.onnx") -> Path:
    """A copy of the model whose weights are read memory-mapped instead of living on the heap.

    A model with inline weights is parsed into memory whole; during calibration onnxruntime holds its
    own copy plus activations. Re-reading it from external data lets the weights be paged in only when
    a pass touches them: peak memory of quantizing SmolLM2 went from 1.9 GB to 1.3 GB (FP32 file 0.54 GB).
    """
    staged = workdir / name
    try:
        ir.save(model, staged, external_data=f"{name}.data")
    except OSError as exc:
        raise SqonnxError(f"cannot stage the model in {workdir.parent}: {exc.strerror}; "
                          "free some space or point TMPDIR elsewhere") from None
    return staged


def _check_quantizable(model: ir.Model, config: QuantizeConfig) -> None:
    opset = model.graph.opset_imports.get("", model.graph.opset_imports.get("ai.onnx", 0))
    # Per-axis DequantizeLinear came in opset 13; DynamicQuantizeLinear and Round in 11.
    per_axis_dq = config.per_channel and not config.integer_form
    needed = max(13 if per_axis_dq else 10, 10 if config.level is Level.O3 else 11)
    if opset < needed and not config.smooth_only:
        hint = " (or --per-tensor, which needs 10)" if per_axis_dq and opset >= 10 and config.level is Level.O3 else ""
        raise SqonnxError(f"the model uses opset {opset}; {config.level.value} {config.format_used.value} "
                          f"quantization needs opset {needed} or newer: convert it with "
                          f"onnx.version_converter.convert_version(model, 17){hint}")
    already = sorted({node.op_type for node in model.graph if node.op_type in QUANTIZED_OPS})
    if already:
        raise SqonnxError(f"the model is already quantized (it has {', '.join(already)}); "
                          "pass the original float model")


def _layer_report(name: str, result: GroupResult, act_max: np.ndarray | None, quantized: bool,
                  static_max: float, level: str, level_reason: str) -> LayerReport:
    scales = result.scales
    before = act_max if act_max is not None else np.zeros(1, np.float32)
    after = before / scales if scales is not None else before
    return LayerReport(
        name=name, activation=str(result.group.activation.name), quantized=quantized,
        smoothing=result.method, folded_into=result.folded_into,
        scale_min=float(scales.min()) if scales is not None else None,
        scale_max=float(scales.max()) if scales is not None else None,
        activation_max_before=float(before.max()), activation_max_after=float(after.max()),
        outlier_ratio_before=_outlier_ratio(before), outlier_ratio_after=_outlier_ratio(after),
        alpha=result.alpha, static_range=static_max, level=level, level_reason=level_reason)


def _outlier_ratio(channel_max: np.ndarray) -> float:
    median = float(np.median(channel_max))
    return float(channel_max.max()) / median if median > 0 else float("inf") if channel_max.max() > 0 else 1.0


def _settings(config: QuantizeConfig, worst_pair: int) -> dict[str, object]:
    target = resolve(config.target)
    target_text = target.value if config.target is not Target.NATIVE else f"native ({target.value}, detected)"
    return {
        "alpha": (f"auto ({config.alpha_range[0]}-{config.alpha_range[1]}, per group)" if config.alpha_auto
                  else config.alpha) if config.smooth else None,
        "calib_method": config.calib_method.value if config.level is Level.O3 else "none (dynamic activations)",
        "level": "auto (O3; O1 per token where one static range cannot hold a group)"
        if config.level_auto else config.level.value,
        "format": config.format_used.value,
        "target": target_text,
        "weights": f"int8 symmetric {'per-channel' if config.per_channel else 'per-tensor'} "
                   f"[-{config.weight_qmax}, {config.weight_qmax}]",
        "weight_range": "reduced (7-bit): no int16 saturation on x86 without VNNI" if config.reduced_range
        else "full (8-bit): only for VNNI, ARM or GPU targets",
        # u8 activation 255 times the worst adjacent weight pair: what vpmaddubsw adds into int16.
        "int16_worst_case": f"{worst_pair} ({'fits' if worst_pair <= INT16_MAX else 'exceeds'} int16 max {INT16_MAX})",
        "activations": config.level.activations + (
            "; int8 dynamic per-token where needed" if config.level_auto else ""),
        "exclude": list(config.exclude),
        "unabsorbed": config.unabsorbed.value,
    } | ({key: "float (--smooth-only)" for key in FLOAT_SETTINGS} if config.smooth_only else {})


# What --smooth-only leaves in float: the metadata says so instead of describing a quantization.
FLOAT_SETTINGS = ("calib_method", "level", "format", "weights", "weight_range", "activations")


def _metadata(settings: dict[str, object], samples: int, quantized: int, smoothed: int) -> dict[str, str]:
    try:
        tool_version = version("sqonnx")
    except PackageNotFoundError:
        tool_version = "unknown"
    keys = ("level", "format", "target", "weights", "weight_range", "int16_worst_case", "activations", "calib_method")
    return {
        "sqonnx.version": tool_version,
        "sqonnx.alpha": "none (not smoothed)" if settings["alpha"] is None else str(settings["alpha"]),
        **{f"sqonnx.{key}": str(settings[key]) for key in keys},
        "sqonnx.calibration_samples": str(samples),
        "sqonnx.quantized_layers": str(quantized),
        "sqonnx.smoothed_layers": str(smoothed),
        "sqonnx.rotation": str(settings.get("rotation", "")),
        **({"sqonnx.smooth_only": "true"} if settings["level"] == "float (--smooth-only)" else {}),
    }


def _model_bytes(path: Path, model: ir.Model) -> int:
    """The .onnx file plus every external data file its initializers point to."""
    data_files = {Path(v.const_value.path) for v in model.graph.initializers.values()
                  if isinstance(v.const_value, ir.ExternalTensor)}
    return path.stat().st_size + sum(f.stat().st_size for f in data_files if f.exists())
