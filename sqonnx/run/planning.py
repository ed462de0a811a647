"""The planning step of building a block: after smoothing, each group's level and static range, each layer's
weight format and rounding, and the measurements behind them (report rows, sensitivities, the rotation's errors).

Decisions only: nothing here touches the graph. `build` hands the plan to the insert passes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from sqonnx.calibrators import ActivationStats
from sqonnx.config import Level, QuantizeConfig
from sqonnx.formats import FORMATS, LayerContext, Planned
from sqonnx.graph.match import NoMatch
from sqonnx.judgements.layer_report import LayerReport
from sqonnx.judgements.quality import RotationJudge
from sqonnx.math.search import (
    AlphaSearch,
    choose_level,
    group_error,
    rotation_errors,
    static_range,
)
from sqonnx.math.smoothing import as_float32, outlier_ratio
from sqonnx.passes.smooth import GroupResult

Weights2D = tuple[np.ndarray, int]  # a weight and the axis that multiplies the activation's channels


@dataclass
class BlockPlan:
    """Every decision for one block's layers, with the measurement behind each."""

    layers: list[Planned] = field(default_factory=list)  # each quantized layer in its format, in graph order
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
    return _GroupLevel(static_max, level, why, static_error if level is Level.O3 else token_error, smoothed_rows)


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
            if layer.name not in quantized or layer.name not in originals:
                continue
            if originals[layer.name][0].shape == layer.weight.shape:
                plan.sensitivity[layer.name] = group_error(as_float32(rows), act_max, [originals[layer.name]],
                                                           result.alpha, scheme, relative=False)
            else:  # outlier channels split (passes.split_channels): the error as written, smoothed rows and weight
                scales = result.scales if result.scales is not None else np.ones_like(act_max)
                plan.sensitivity[layer.name] = group_error(as_float32(rows) / scales, act_max / scales,
                                                           [(layer.weight, layer.in_axis)], None, scheme,
                                                           relative=False)


def _plan_layers(result: GroupResult, act_max: np.ndarray | None, group_level: _GroupLevel, config: QuantizeConfig,
                 stats: ActivationStats, quantized: set[str], plan: BlockPlan) -> None:
    """Each layer of the group: the first wanted format whose error model takes it (formats.FORMATS), and its
    report row; a format that does not take it says why, and the reason leads the row's."""
    group = result.group
    hessian = _hessian(stats, str(group.activation.name), result.scales) if config.gptq else None
    context = LayerContext(group_level.static_max, group_level.level, group_level.why, group_level.error,
                           group_level.smoothed_rows, hessian)
    why = group_level.why
    for layer in group.layers:
        is_quantized = layer.name in quantized and not config.smooth_only
        layer_level, layer_why, layer_error = group_level.level.value, why, group_level.error
        if is_quantized:
            declined: list[str] = []
            for fmt in FORMATS:
                planned = fmt.plan(layer, context, config) if fmt.wanted(config) else NoMatch("")
                if not isinstance(planned, NoMatch):
                    break
                if planned.reason:
                    declined.append(planned.reason)
            assert not isinstance(planned, NoMatch), f"no format takes {layer.name}"
            plan.layers.append(planned)
            layer_level, layer_why, layer_error = planned.level, "; ".join([*declined, planned.reason]), planned.error
        plan.layer_reports.append(_layer_report(
            layer.name, result, act_max, is_quantized, group_level.static_max, layer_level if is_quantized else "",
            layer_why if is_quantized else "", layer_error if is_quantized else None))


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
