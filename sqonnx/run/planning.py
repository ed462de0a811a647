"""The planning step of building a block: after smoothing, each group's level and static range, each layer's
weight format and rounding, and the measurements behind them (report rows, sensitivities, the rotation's errors).

Decisions only: nothing here touches the graph. `build` hands the plan to the insert passes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from sqonnx.calibrators import ActivationStats
from sqonnx.config import Level, QuantizeConfig, Weights
from sqonnx.graph.layers import LinearLayer
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
from sqonnx.math.smoothing import as_float32, outlier_ratio
from sqonnx.passes.insert_matmul_nbits import NBitsLayer
from sqonnx.passes.insert_qdq import LayerQuantization
from sqonnx.passes.smooth import GroupResult
from sqonnx.targets import rules_of, static_only

W4A8 = "W4A8"  # a layer's level in the report when it is written as MatMulNBits (its kernel quantizes activations)

Weights2D = tuple[np.ndarray, int]  # a weight and the axis that multiplies the activation's channels


@dataclass
class BlockPlan:
    """Every decision for one block's layers, with the measurement behind each."""

    int8: list[LayerQuantization] = field(default_factory=list)
    int4: list[NBitsLayer] = field(default_factory=list)
    layer_reports: list[LayerReport] = field(default_factory=list)
    # Per quantized layer: its output error when only it is quantized, on calibration rows, in the output's own
    # units (--keep-float-budget ranks layers by it); filled when asked for.
    sensitivity: dict[str, float] = field(default_factory=dict)
    # Per group reading the rotated stream: its INT8 error on calibration rows rotated and as it would be without
    # the rotation (search.rotation_errors); filled when a rotation judge is given.
    rotation_errors: dict[str, tuple[float, float]] = field(default_factory=dict)


@dataclass(frozen=True)
class _GroupLevel:
    """A group's activation quantization: level, static range, why, and its error on calibration rows."""

    static_max: float = 0.0
    level: Level = Level.O3
    why: str = ""
    error: float | None = None
    smoothed_rows: np.ndarray | None = None
    kept_float: bool = False  # a static-only target and a group that needs per-token activations


def plan_block(groups: list[GroupResult], config: QuantizeConfig, stats: ActivationStats, quantized: set[str],
               originals: dict[str, Weights2D], scheme: AlphaSearch, rotation: RotationJudge | None,
               sensitivities: bool) -> BlockPlan:
    """Plan every group of a smoothed block. `originals`: the weights before smoothing, for the judgements that
    compare against them (sensitivities, the rotation)."""
    plan = BlockPlan()
    for result in groups:
        name = str(result.group.activation.name)
        act_max = stats.channel_max.get(name)
        group_level = _GroupLevel(level=config.level)
        if act_max is not None and any(layer.name in quantized for layer in result.group.layers):
            group_level = _group_level(result, act_max, stats.rows.get(name), config, scheme)
            _judge(result, act_max, stats.rows.get(name), config, quantized, originals, scheme, rotation,
                   sensitivities, plan)
        _plan_layers(result, act_max, group_level, config, stats, quantized, plan)
    return plan


def _group_level(result: GroupResult, act_max: np.ndarray, rows: np.ndarray | None, config: QuantizeConfig,
                 scheme: AlphaSearch) -> _GroupLevel:
    scales = result.scales if result.scales is not None else np.ones_like(act_max)
    smoothed_rows = None if rows is None else as_float32(rows) / scales
    static_max = static_range(config.calib_method, act_max / scales, smoothed_rows)
    if not (config.level_auto and smoothed_rows is not None):
        return _GroupLevel(static_max, config.level, smoothed_rows=smoothed_rows)
    level, static_error, token_error = choose_level(
        smoothed_rows, act_max / scales, [(ly.weight, ly.in_axis) for ly in result.group.layers], scheme)
    why = f"O3 error {static_error:.2g} vs per-token {token_error:.2g} on calibration rows"
    return _GroupLevel(static_max, level, why, static_error if level is Level.O3 else token_error, smoothed_rows,
                       kept_float=level is Level.O1 and static_only(config.target))


def _judge(result: GroupResult, act_max: np.ndarray, rows: np.ndarray | None, config: QuantizeConfig,
           quantized: set[str], originals: dict[str, Weights2D], scheme: AlphaSearch,
           rotation: RotationJudge | None, sensitivities: bool, plan: BlockPlan) -> None:
    """The measurements later decisions of the run need: the rotation's errors, each layer's sensitivity."""
    if rows is None:
        return
    group = result.group
    name = str(group.activation.name)
    if rotation is not None and name in rotation.readers and not config.smooth_only:
        plan.rotation_errors[name] = rotation_errors(
            as_float32(rows), [originals[ly.name] for ly in group.layers if ly.name in originals], rotation.q,
            result.alpha, scheme)
    if sensitivities:
        for layer in group.layers:
            if layer.name in quantized and layer.name in originals:
                plan.sensitivity[layer.name] = group_error(as_float32(rows), act_max, [originals[layer.name]],
                                                           result.alpha, scheme, relative=False)


def _plan_layers(result: GroupResult, act_max: np.ndarray | None, group_level: _GroupLevel, config: QuantizeConfig,
                 stats: ActivationStats, quantized: set[str], plan: BlockPlan) -> None:
    """Each layer of the group: its weight format (int4 where 4 bits hold, else int8), rounding, report row."""
    group = result.group
    hessian = _hessian(stats, str(group.activation.name), result.scales) if config.needs_hessians else None
    level, why, error = group_level.level, group_level.why, group_level.error
    for layer in group.layers:
        is_quantized = layer.name in quantized and not config.smooth_only and not group_level.kept_float
        layer_level, layer_why, layer_error = level.value, why, error
        if is_quantized:
            four, layer_level, layer_why, layer_error = _int4_or_int8(layer, group_level, hessian, config)
            if four is not None:
                plan.int4.append(four)
            else:
                weight = layer.weight if layer.in_axis == 0 else layer.weight.T  # [in, out]
                rounded = round_weight(weight, Grid.int8(config.weight_qmax), hessian, config.act_order) \
                    if hessian is not None and config.per_channel else None
                plan.int8.append(LayerQuantization(layer, group_level.static_max, level, rounded))
        if group_level.kept_float and layer.name in quantized:
            layer_why = (f"float: needs per-token activations, which {rules_of(config.target).runtime} has no form "
                         f"for ({why})")
        plan.layer_reports.append(_layer_report(
            layer.name, result, act_max, is_quantized, group_level.static_max, layer_level if is_quantized else "",
            layer_why if is_quantized or group_level.kept_float else "", layer_error if is_quantized else None))


def _int4_or_int8(layer: LinearLayer, group_level: _GroupLevel, hessian: np.ndarray | None,
                  config: QuantizeConfig) -> tuple[NBitsLayer | None, str, str, float | None]:
    """--weights int4: the layer as MatMulNBits where its W4A8 error on calibration rows is within
    INT4_ERROR_LIMIT. Returns the int4 layer (None: int8) and the report's level, reason and error."""
    level, why, error = group_level.level.value, group_level.why, group_level.error
    if config.weights is not Weights.INT4:
        return None, level, why, error
    weight = layer.weight if layer.in_axis == 0 else layer.weight.T  # [in, out]
    four = round_weight(weight, Grid.int4(config.int4_block), hessian, config.act_order)
    rows = group_level.smoothed_rows
    four_error = 0.0 if rows is None else w4a8_error(rows, weight, four, config.int4_block)
    if four_error > INT4_ERROR_LIMIT:
        return None, level, f"W4A8 error {four_error:.2g} on calibration rows (limit {INT4_ERROR_LIMIT}); {why}", error
    return NBitsLayer(layer, four), W4A8, f"W4A8 error {four_error:.2g} on calibration rows", four_error


def _hessian(stats: ActivationStats, activation: str, scales: np.ndarray | None) -> np.ndarray | None:
    """X^T X of the group's input as the quantized layers see it: divided by s on both sides when smoothed."""
    found = stats.hessians.get(activation)
    if found is None or scales is None:
        return found
    inverse = 1.0 / scales.astype(np.float64)
    return found * inverse[:, None] * inverse[None, :]


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
        outlier_ratio_before=outlier_ratio(before), outlier_ratio_after=outlier_ratio(after),
        alpha=result.alpha, static_range=static_max, level=level, level_reason=level_reason,
        row_error=row_error)
