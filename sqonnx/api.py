"""`sqonnx.quantize`: the whole pipeline, calibrate -> smooth -> quantize -> clean up -> save -> check.

Each step is a pass or a pure function; this module only wires them and builds the report.
"""

from __future__ import annotations

import logging
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from sqonnx.calibrators import calibration_feeds, collect_channel_max
from sqonnx.config import QuantizeConfig
from sqonnx.errors import SqonnxError
from sqonnx.graph import find_linear_layers, load_model
from sqonnx.kernels import KernelCheck, inspect_cpu_kernels
from sqonnx.output import check_output_path, save_atomically
from sqonnx.passes.insert_qdq import InsertQDQPass, LayerQuantization
from sqonnx.passes.smooth import GroupResult, SmoothPass
from sqonnx.passes.smoothing_groups import find_smoothing_groups
from sqonnx.report import LayerReport, QuantizeReport

logger = logging.getLogger(__name__)

QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "QLinearMatMul", "MatMulInteger",
                 "DynamicQuantizeLinear", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QGemm"}


def quantize(model_path: str | Path, output_path: str | Path | None = None,
             config: QuantizeConfig | None = None, *, progress: bool = False) -> QuantizeReport:
    """Quantize `model_path` to W8A8 SmoothQuant and save it at `output_path` (default `<stem>.int8.onnx`)."""
    started = time.perf_counter()
    config = config or QuantizeConfig()
    model_path = Path(model_path)
    output_path = Path(output_path) if output_path is not None else model_path.with_suffix(".int8.onnx")
    model = load_model(model_path)
    check_output_path(model_path, output_path)
    graph = model.graph
    _check_quantizable(model, config)
    input_bytes = _model_bytes(model_path, model)
    external_data = any(isinstance(v.const_value, ir.ExternalTensor) for v in graph.initializers.values())

    layers = find_linear_layers(graph)
    quantized = {layer.name for layer in layers if not config.is_excluded(layer.name)}
    if not quantized:
        raise SqonnxError(f"{model_path.name} has no MatMul/Gemm with a constant float weight to quantize"
                          + (" outside --exclude patterns" if layers else ""))
    groups = find_smoothing_groups(graph)
    wanted = {str(g.activation.name): g.channels for g in groups if any(ly.name in quantized for ly in g.layers)}

    feeds = calibration_feeds(graph, model_path.parent, config.calibration)
    channel_max = collect_channel_max(model, wanted, feeds, feeds.count, progress=progress)

    results = {id(g): GroupResult(g, None, "", "not smoothed: --no-smooth") for g in groups}
    if config.smooth:
        smooth = SmoothPass(groups, channel_max, config.alpha, config.unabsorbed, quantized)
        smooth(model)
        results = {id(r.group): r for r in smooth.results}

    plan: list[LayerQuantization] = []
    layer_reports: list[LayerReport] = []
    for group in groups:
        result = results[id(group)]
        act_max = channel_max.get(str(group.activation.name))
        for layer in group.layers:
            is_quantized = layer.name in quantized
            layer_reports.append(_layer_report(layer.name, result, act_max, is_quantized))
            if is_quantized:
                plan.append(LayerQuantization(layer, layer_reports[-1].activation_max_after))
    InsertQDQPass(plan, config.weight_qmax, config.per_channel)(model)
    ir.passes.Sequential(
        common_passes.RemoveUnusedNodesPass(),
        common_passes.TopologicalSortPass(),
    )(model)
    model.metadata_props.update(_metadata(config, feeds.count, len(plan), sum(r.scale_min is not None
                                                                              for r in layer_reports)))

    kernels: list[KernelCheck] = []

    def validate(staged: Path) -> None:
        if config.verify_fusion:
            kernels.append(inspect_cpu_kernels(staged))

    written = save_atomically(model, output_path, validate, external_data=external_data)
    report = QuantizeReport(
        input_path=str(model_path), output_path=str(output_path), settings=_settings(config),
        calibration=feeds.description, layers=layer_reports, kernels=kernels[0] if kernels else None,
        input_bytes=input_bytes, output_bytes=written, seconds=time.perf_counter() - started)
    if report.kernels is not None and report.kernels.unfused:
        logger.warning("onnxruntime left %d quantized layers unfused (float MatMul after DequantizeLinear): %s",
                       len(report.kernels.unfused), ", ".join(report.kernels.unfused[:5]))
    return report


def _check_quantizable(model: ir.Model, config: QuantizeConfig) -> None:
    opset = model.graph.opset_imports.get("", model.graph.opset_imports.get("ai.onnx", 0))
    needed = 13 if config.per_channel else 10
    if opset < needed:
        hint = " (or --per-tensor, which needs 10)" if config.per_channel and opset >= 10 else ""
        raise SqonnxError(f"the model uses opset {opset}; INT8 Q/DQ{' per channel' if config.per_channel else ''} "
                          f"needs opset {needed} or newer: convert it with "
                          f"onnx.version_converter.convert_version(model, 17){hint}")
    already = sorted({node.op_type for node in model.graph if node.op_type in QUANTIZED_OPS})
    if already:
        raise SqonnxError(f"the model is already quantized (it has {', '.join(already)}); "
                          "pass the original float model")


def _layer_report(name: str, result: GroupResult, act_max: np.ndarray | None, quantized: bool) -> LayerReport:
    scales = result.scales
    before = act_max if act_max is not None else np.zeros(1, np.float32)
    after = before / scales if scales is not None else before
    return LayerReport(
        name=name, activation=str(result.group.activation.name), quantized=quantized,
        smoothing=result.method, folded_into=result.folded_into,
        scale_min=float(scales.min()) if scales is not None else None,
        scale_max=float(scales.max()) if scales is not None else None,
        activation_max_before=float(before.max()), activation_max_after=float(after.max()),
        outlier_ratio_before=_outlier_ratio(before), outlier_ratio_after=_outlier_ratio(after))


def _outlier_ratio(channel_max: np.ndarray) -> float:
    median = float(np.median(channel_max))
    return float(channel_max.max()) / median if median > 0 else float("inf") if channel_max.max() > 0 else 1.0


def _settings(config: QuantizeConfig) -> dict[str, object]:
    return {
        "alpha": config.alpha if config.smooth else None,
        "level": config.level.value,
        "weights": f"int8 symmetric {'per-channel' if config.per_channel else 'per-tensor'} "
                   f"[-{config.weight_qmax}, {config.weight_qmax}]",
        "weight_range": "reduced (7-bit, safe on x86 without VNNI)" if config.reduce_range
        else "full (needs VNNI, AVX-512 VNNI, ARM or GPU)",
        "activations": "int8 symmetric static per-tensor (min-max)",
        "exclude": list(config.exclude),
        "unabsorbed": config.unabsorbed.value,
    }


def _metadata(config: QuantizeConfig, samples: int, quantized: int, smoothed: int) -> dict[str, str]:
    try:
        tool_version = version("sqonnx")
    except PackageNotFoundError:
        tool_version = "unknown"
    settings = _settings(config)
    return {
        "sqonnx.version": tool_version,
        "sqonnx.alpha": "none (not smoothed)" if settings["alpha"] is None else str(config.alpha),
        "sqonnx.level": config.level.value,
        "sqonnx.weights": str(settings["weights"]),
        "sqonnx.weight_range": str(settings["weight_range"]),
        "sqonnx.activations": str(settings["activations"]),
        "sqonnx.calibration_samples": str(samples),
        "sqonnx.quantized_layers": str(quantized),
        "sqonnx.smoothed_layers": str(smoothed),
    }


def _model_bytes(path: Path, model: ir.Model) -> int:
    """The .onnx file plus every external data file its initializers point to."""
    data_files = {Path(v.const_value.path) for v in model.graph.initializers.values()
                  if isinstance(v.const_value, ir.ExternalTensor)}
    return path.stat().st_size + sum(f.stat().st_size for f in data_files if f.exists())
