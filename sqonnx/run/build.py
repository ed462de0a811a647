"""Smooth and quantize one block (or a whole small model) whose calibration statistics are known.

The block is a model of its own (`streaming.extract_block`): the passes find their groups on it, fold 1/s,
choose each group's level and static range from the statistics, and insert the integer ops.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from sqonnx.calibrators import ActivationStats
from sqonnx.config import Level, QuantizeConfig, Weights
from sqonnx.graph.layers import find_linear_layers
from sqonnx.graph.tensors import HALF_TYPES, SHARED, opset_version
from sqonnx.judgements.layer_report import LayerReport
from sqonnx.judgements.quality import RotationJudge
from sqonnx.math.gptq import Grid, round_weight
from sqonnx.math.search import (
    INT4_ERROR_LIMIT,
    AlphaSearch,
    choose_level,
    group_error,
    rotation_errors,
    static_range,
    w4a8_error,
)
from sqonnx.math.smoothing import as_float32
from sqonnx.passes.float_islands import FloatIslandsPass
from sqonnx.passes.insert_integer_matmul import InsertIntegerMatMulPass
from sqonnx.passes.insert_matmul_nbits import InsertMatMulNBitsPass, NBitsLayer
from sqonnx.passes.insert_qdq import InsertQDQPass, LayerQuantization
from sqonnx.passes.smooth import GroupResult, SmoothPass
from sqonnx.passes.smoothing_groups import find_smoothing_groups
from sqonnx.passes.transposed import RestoreTransposedCopiesPass
from sqonnx.targets import Target, static_only

W4A8 = "W4A8"  # a layer's level in the report when it is written as MatMulNBits (its kernel quantizes activations)


@dataclass
class Built:
    """A smoothed and quantized block in memory, before it is saved."""

    model: ir.Model
    layer_reports: list[LayerReport]
    plan: list[LayerQuantization]
    # Per quantized layer: its output error when only it is quantized, on calibration rows, in the output's own
    # units (--keep-float-budget ranks layers by it); filled when `sensitivities` is asked for.
    sensitivity: dict[str, float]
    # Per group reading the rotated stream: its INT8 error on calibration rows rotated and as it would be without
    # the rotation (search.rotation_errors); filled when `rotation` is given.
    rotation_errors: dict[str, tuple[float, float]]


def build(model: ir.Model, config: QuantizeConfig, stats: ActivationStats, quantized: set[str],
          sensitivities: bool = False, rotation: RotationJudge | None = None) -> Built:
    """Smooth and quantize `model` (a fresh copy of a block) with its calibration statistics. `rotation`: judge
    the residual-stream rotation on the groups that read it."""
    graph = model.graph
    if not config.smooth_only:
        _weights_in_float32(graph, quantized)
    channel_max = stats.channel_max
    scheme = AlphaSearch(stats.rows, config.alpha_grid, config.level, config.weight_qmax, config.per_channel,
                         config.calib_method, config.int4_block if config.weights is Weights.INT4 else 0)
    originals = {layer.name: (layer.weight, layer.in_axis) for group in find_smoothing_groups(graph)
                 for layer in group.layers
                 if sensitivities or (rotation is not None and str(group.activation.name) in rotation.readers)}
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
    nbits: list[NBitsLayer] = []
    float_groups: set[str] = set()  # --target tensorrt: groups --level auto puts per-token stay float
    layer_reports: list[LayerReport] = []
    sensitivity: dict[str, float] = {}
    judged: dict[str, tuple[float, float]] = {}
    for result in results:
        group = result.group
        act_max = channel_max.get(str(group.activation.name))
        rows = stats.rows.get(str(group.activation.name))
        static_max, level, why, error = 0.0, config.level, "", None
        smoothed_rows = None
        if act_max is not None and any(layer.name in quantized for layer in group.layers):
            scales = result.scales if result.scales is not None else np.ones_like(act_max)
            smoothed_rows = None if rows is None else as_float32(rows) / scales
            static_max = static_range(config.calib_method, act_max / scales, smoothed_rows)
            if config.level_auto and smoothed_rows is not None:
                level, static_error, token_error = choose_level(
                    smoothed_rows, act_max / scales, [(ly.weight, ly.in_axis) for ly in group.layers], scheme)
                why = f"O3 error {static_error:.2g} vs per-token {token_error:.2g} on calibration rows"
                error = static_error if level is Level.O3 else token_error
                if level is Level.O1 and static_only(config.target):
                    float_groups.add(str(group.activation.name))
            name = str(group.activation.name)
            if rotation is not None and rows is not None and name in rotation.readers and not config.smooth_only:
                judged[name] = rotation_errors(as_float32(rows), [originals[ly.name] for ly in group.layers
                                                                  if ly.name in originals], rotation.q,
                                               result.alpha, scheme)
            if sensitivities and rows is not None:
                for layer in group.layers:
                    if layer.name in quantized and layer.name in originals:
                        sensitivity[layer.name] = group_error(as_float32(rows), act_max,
                                                              [originals[layer.name]], result.alpha, scheme,
                                                              relative=False)
        hessian = _hessian(stats, str(group.activation.name), result.scales) if config.needs_hessians else None
        float_group = str(group.activation.name) in float_groups
        for layer in group.layers:
            is_quantized = layer.name in quantized and not config.smooth_only and not float_group
            four = None
            layer_level, layer_why, layer_error = level.value, why, error
            if is_quantized:
                weight = layer.weight if layer.in_axis == 0 else layer.weight.T  # [in, out]
                if config.weights is Weights.INT4:
                    four = round_weight(weight, Grid.int4(config.int4_block), hessian, config.act_order)
                    four_error = 0.0 if smoothed_rows is None else w4a8_error(
                        smoothed_rows, weight, four, config.int4_block)
                    if four_error > INT4_ERROR_LIMIT:
                        layer_why = f"W4A8 error {four_error:.2g} on calibration rows (limit {INT4_ERROR_LIMIT}); {why}"
                        four = None
                    else:
                        layer_level, layer_error = W4A8, four_error
                        layer_why = f"W4A8 error {four_error:.2g} on calibration rows"
                if four is not None:
                    nbits.append(NBitsLayer(layer, four))
                else:
                    rounded = round_weight(weight, Grid.int8(config.weight_qmax), hessian, config.act_order) \
                        if hessian is not None and config.per_channel else None
                    plan.append(LayerQuantization(layer, static_max, level, rounded))
            if float_group and layer.name in quantized:
                runtime = "TensorRT" if config.target is Target.TENSORRT else "onnxruntime's CUDA provider"
                layer_why = f"float: needs per-token activations, which {runtime} has no form for ({why})"
            layer_reports.append(_layer_report(layer.name, result, act_max, is_quantized, static_max,
                                               layer_level if is_quantized else "",
                                               layer_why if is_quantized or float_group else "",
                                               layer_error if is_quantized else None))
    opset = opset_version(graph)
    FloatIslandsPass([*(item.layer for item in plan), *(item.layer for item in nbits)])(model)
    InsertMatMulNBitsPass(nbits)(model)
    # O1 has no Q/DQ spelling: its layers always get integer ops, the others the configured form.
    integer = [item for item in plan if config.integer_form or item.level is Level.O1]
    InsertIntegerMatMulPass(integer, config.weight_qmax, config.per_channel, config.level, opset,
                            signed=config.target is Target.CUDA)(model)
    InsertQDQPass([item for item in plan if not (config.integer_form or item.level is Level.O1)],
                  config.weight_qmax, config.per_channel)(model)
    ir.passes.Sequential(
        RestoreTransposedCopiesPass(),
        common_passes.RemoveUnusedNodesPass(),
        common_passes.TopologicalSortPass(),
    )(model)
    return Built(model, layer_reports, [*plan, *(LayerQuantization(item.layer, 0.0) for item in nbits)], sensitivity,
                 judged)


def _hessian(stats: ActivationStats, activation: str, scales: np.ndarray | None) -> np.ndarray | None:
    """X^T X of the group's input as the quantized layers see it: divided by s on both sides when smoothed."""
    found = stats.hessians.get(activation)
    if found is None or scales is None:
        return found
    inverse = 1.0 / scales.astype(np.float64)
    return found * inverse[:, None] * inverse[None, :]


def _weights_in_float32(graph: ir.Graph, quantized: set[str]) -> None:
    """The float16 / bfloat16 weights of the layers about to be quantized, in float32: smoothing folds and
    quantization then compute in float32 without converting from and back to half at every step (a 7B FP16 model
    spent half its build time converting), and the quantizer replaces them anyway. A weight that another node
    reads too (a layer kept float, another block) stays as it is."""
    readers = {id(layer.node) for layer in find_linear_layers(graph) if layer.name in quantized}
    for layer in find_linear_layers(graph):
        value = layer.weight_value
        tensor = value.const_value
        if layer.name not in quantized or tensor is None or tensor.dtype not in HALF_TYPES or value.meta.get(SHARED):
            continue
        if value.is_graph_output() or any(use.idx != 1 or id(use.node) not in readers for use in value.uses()):
            continue
        value.const_value = ir.tensor(as_float32(tensor.numpy()), name=value.name)
        value.type = ir.TensorType(ir.DataType.FLOAT)


def _layer_report(name: str, result: GroupResult, act_max: np.ndarray | None, quantized: bool,
                  static_max: float, level: str, level_reason: str, row_error: float | None) -> LayerReport:
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
        alpha=result.alpha, static_range=static_max, level=level, level_reason=level_reason,
        row_error=row_error)


def _outlier_ratio(channel_max: np.ndarray) -> float:
    median = float(np.median(channel_max))
    return float(channel_max.max()) / median if median > 0 else float("inf") if channel_max.max() > 0 else 1.0
