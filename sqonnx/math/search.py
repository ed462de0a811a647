"""Searches that need real activation values, not only maxima (numpy only, no graph code).

- `search_alpha`: per smoothing group, the α whose INT8 output is closest to FP32 on calibration rows.
  One global α is a compromise: on SmolLM2 0.5 suits q/k/v while down_proj wants more migration. The
  error is measured at the chosen level (static per-tensor, dynamic per-tensor or per-token activations)
  with the weight quantization that will really be used, summed over the group's layers.
- `static_range`: the static activation range of O3, by min-max, percentile or MSE-optimal clipping.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sqonnx.math.gptq import Grid, Rounded, nearest
from sqonnx.math.quant import (
    ACTIVATION_QMAX,
    CalibMethod,
    Level,
    fake_quant,
    quantize_symmetric,
    quantize_weight,
    symmetric_scale,
)
from sqonnx.math.rotation import Orthogonal
from sqonnx.math.smoothing import as_float32, group_weight_max, smoothing_scales

# --level auto: a group goes per-token when its static (O3) error is this many times its per-token error.
LEVEL_AUTO_RATIO = 4.0
MAX_CLIP_VALUES = 1 << 16  # values used to choose a clipping threshold (a strided subsample)


def static_range(method: CalibMethod, channel_max: np.ndarray, rows: np.ndarray | None) -> float:
    """Static per-tensor range of an activation (already divided by s) from its per-channel maxima over
    all calibration samples and a sample of its rows."""
    full = float(np.max(channel_max))
    if method is CalibMethod.MINMAX or rows is None or full == 0.0:
        return full
    magnitudes = np.abs(as_float32(rows)).ravel()
    magnitudes = magnitudes[:: max(1, magnitudes.size // MAX_CLIP_VALUES)]
    if method is CalibMethod.PERCENTILE:
        return min(full, float(np.percentile(magnitudes, 99.99)))
    candidates = full * np.linspace(0.05, 1.0, 64)
    errors = [float(np.sum((fake_quant(magnitudes, c / ACTIVATION_QMAX) - magnitudes) ** 2)) for c in candidates]
    return float(candidates[int(np.argmin(errors))])


def quantize_activation_like(level: Level, x: np.ndarray, static_max: float) -> np.ndarray:
    """x after the activation quantization of `level` (symmetric int8; O2's asymmetric uint8 over the
    sampled rows as one tensor)."""
    if level is Level.O3:
        return fake_quant(x, max(static_max, 1e-12) / ACTIVATION_QMAX)
    if level is Level.O1:
        scale = np.maximum(np.abs(x).max(axis=1, keepdims=True), 1e-12) / ACTIVATION_QMAX
        return fake_quant(x, scale)
    low, high = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = (high - low) / 255 if high > low else 1.0
    zero = np.rint(-low / scale)
    return (np.clip(np.rint(x / scale) + zero, 0, 255) - zero) * scale


@dataclass(frozen=True)
class AlphaSearch:
    """Settings of the per-group α search; `rows` are calibration rows per activation name."""

    rows: dict[str, np.ndarray]
    grid: tuple[float, ...]
    level: Level
    weight_qmax: int
    per_channel: bool
    calib_method: CalibMethod = CalibMethod.MINMAX
    # --weights int4: judge α on the W4A8 error (4-bit blocks of this many input channels, int8 activations per
    # row and block, as MatMulNBits computes); 0: INT8 at `level`
    int4_block: int = 0

    def choose(self, activation: str, act_max: np.ndarray, weights: list[tuple[np.ndarray, int]]) -> float | None:
        """The best α on the grid, or None when leaving the group unsmoothed is better than any."""
        rows = as_float32(self.rows[activation])
        candidates: list[float | None] = [None, *self.grid]
        errors = [group_error(rows, act_max, weights, alpha, self) for alpha in candidates]
        return candidates[int(np.argmin(errors))]


def group_error(rows: np.ndarray, act_max: np.ndarray, weights: list[tuple[np.ndarray, int]],
                alpha: float | None, search: AlphaSearch, relative: bool = True) -> float:
    """Relative squared error of the group's outputs, INT8 (after smoothing with α) against FP32
    (`relative=False`: the mean squared error per row, in the output's own units).

    At O3, s and the static range are fitted on the first half of the rows (samples come in order) and
    the error is measured on the second half: fitted and scored on the same rows, a range never clips,
    which favours the α whose range fits calibration data most tightly and then clips unseen inputs.
    Wide layers are scored on MAX_ERROR_COLUMNS of their output columns (see `_columns`).
    """
    weight_max = group_weight_max(weights)
    if search.int4_block:
        return _w4a8_group_error(rows, act_max, weight_max, weights, alpha, search.int4_block, relative)
    static_max = 0.0
    if search.level is Level.O3 and len(rows) >= 2:
        fit, rows = rows[: len(rows) // 2], rows[len(rows) // 2:]
        fit_max = np.abs(fit).max(axis=0)
        scales = np.ones_like(act_max) if alpha is None else smoothing_scales(fit_max, weight_max, alpha)
        static_max = static_range(search.calib_method, fit_max / scales, fit / scales)
    else:
        scales = np.ones_like(act_max) if alpha is None else smoothing_scales(act_max, weight_max, alpha)
        static_max = float(np.max(act_max / scales))
    x_hat = quantize_activation_like(search.level, rows / scales, static_max)
    error = total = 0.0
    for weight, in_axis in weights:
        w = _columns(weight, in_axis)  # [in, out]
        reference = rows @ w
        error += float(np.sum((x_hat @ _dequantized(w, scales, weight, in_axis, search) - reference) ** 2))
        total += float(np.sum(reference ** 2))
    return error / max(total, 1e-30) if relative else error / max(len(rows), 1)



def _w4a8_group_error(rows: np.ndarray, act_max: np.ndarray, weight_max: np.ndarray,
                      weights: list[tuple[np.ndarray, int]], alpha: float | None, block: int, relative: bool) -> float:
    """`group_error` for MatMulNBits layers: 4-bit block weights (rounded to nearest), int8 block activations."""
    scales = np.ones_like(act_max) if alpha is None else smoothing_scales(act_max, weight_max, alpha)
    x_hat = block_quantized_rows(rows / scales, block)
    error = total = 0.0
    for weight, in_axis in weights:
        w = _columns(weight, in_axis)
        reference = rows @ w
        error += float(np.sum((x_hat @ nearest(w * scales[:, None], Grid.int4(block)).dequantized() - reference) ** 2))
        total += float(np.sum(reference ** 2))
    return error / max(total, 1e-30) if relative else error / max(len(rows), 1)


# Output columns the rotation's judgement takes per group (Q W costs n x n per column).
ROTATION_COLUMNS = 256


def rotation_errors(rows: np.ndarray, weights: list[tuple[np.ndarray, int]], q: Orthogonal, alpha: float | None,
                    search: AlphaSearch) -> tuple[float, float]:
    """A group that reads the rotated residual stream, INT8 as built (rows x̂Q, weights Qᵀ diag(g) W) and as it
    would be without the rotation (rows x̂, weights diag(g) W, smoothed the same way: per-channel factors on
    (x̂, diag(g) W) are the unrotated model's on (x̂ g, W)), on the same calibration rows: relative errors.

    Rotation spreads outlier channels, but it also spreads the folded norm gains g over every weight row: where a
    trained norm has large gains on channels the stream keeps small (x̂ g ordinary, g large), W's per-column
    scales are set by the spread gains and the other channels drown in their rounding. No per-channel factor
    can take that back after the rotation."""
    columns = []
    for weight, axis in weights:
        w = _columns(weight, axis)
        columns.append((w[:, :: max(1, w.shape[1] // ROTATION_COLUMNS)], 0))
    rotated = group_error(rows, np.abs(rows).max(axis=0), columns, alpha, search)
    plain_rows = as_float32(q.right_transpose(rows.astype(q.work_dtype)))
    plain = [(as_float32(q.left(w.astype(q.work_dtype))), 0) for w, _ in columns]
    return rotated, group_error(plain_rows, np.abs(plain_rows).max(axis=0), plain, alpha, search)


# Output columns a layer's error is measured on (evenly spaced): the relative error of 512 columns over the
# calibration rows (a quarter of a million outputs) estimates that of all of them closely, and a 32000-column
# LM head or a 22016-column gate/up pair then costs what a 512-column layer does (over every column, the level
# decisions of a Llama-2-7B cost a third of its calibration forward passes).
MAX_ERROR_COLUMNS = 512


def _columns(weight: np.ndarray, in_axis: int) -> np.ndarray:
    """The weight as [in, out] float32, at most MAX_ERROR_COLUMNS of its output columns."""
    w = weight if in_axis == 0 else weight.T
    if w.shape[1] > MAX_ERROR_COLUMNS:
        w = w[:, np.linspace(0, w.shape[1] - 1, MAX_ERROR_COLUMNS).astype(np.int64)]
    return as_float32(w)


def _dequantized(columns: np.ndarray, scales: np.ndarray, weight: np.ndarray, in_axis: int,
                 search: AlphaSearch) -> np.ndarray:
    """`columns` (of `weight`, [in, out]) times s, quantized as the layer will be and dequantized; a per-tensor
    scale is that of the whole weight."""
    smoothed = columns * scales[:, None]
    if search.per_channel:
        codes, w_scale = quantize_weight(smoothed, 0, search.weight_qmax, True)
    else:
        whole = float(np.max(np.abs(weight) * (scales[:, None] if in_axis == 0 else scales[None, :])))
        w_scale = symmetric_scale(whole, search.weight_qmax)
        codes = quantize_symmetric(smoothed, w_scale, search.weight_qmax)
    return codes * w_scale


# --weights int4: a layer stays W8A8 where its W4A8 output error on calibration rows (relative, squared) is above
# this. A 4-bit block-32 grid on a well-behaved weight costs about 0.005-0.01 (uniform rounding noise of a step of
# max|w| / 7.5); ten times that is a layer 4 bits break (massive activations, an LM head with outlier columns).
INT4_ERROR_LIMIT = 0.05


def block_quantized_rows(rows: np.ndarray, block: int) -> np.ndarray:
    """`rows` [T, K] as MatMulNBits' CPU kernel sees them at accuracy_level 4: int8, one scale per row and block of
    `block` channels (max |x| / 127), rounded to nearest."""
    t, k = rows.shape
    padded = np.zeros((t, -(-k // block) * block), np.float32)
    padded[:, :k] = rows
    blocks = padded.reshape(t, -1, block)
    scale = np.maximum(np.abs(blocks).max(axis=2, keepdims=True), 1e-30) / ACTIVATION_QMAX
    return fake_quant(blocks, scale).reshape(t, -1)[:, :k]


def w4a8_error(rows: np.ndarray, weight: np.ndarray, rounded: Rounded, block: int) -> float:
    """Relative squared output error of a W4A8 layer (`weight` [K, N] float, `rounded` it on the 4-bit grid) on
    calibration rows already divided by s, on at most MAX_ERROR_COLUMNS output columns."""
    columns = np.linspace(0, weight.shape[1] - 1, min(weight.shape[1], MAX_ERROR_COLUMNS)).astype(np.int64)
    reference = rows @ as_float32(weight[:, columns])
    output = block_quantized_rows(rows, block) @ rounded.dequantized(columns)
    return float(np.sum((output - reference) ** 2) / max(float(np.sum(reference ** 2)), 1e-30))


def choose_level(rows: np.ndarray, act_max: np.ndarray, weights: list[tuple[np.ndarray, int]],
                 search: AlphaSearch) -> tuple[Level, float, float]:
    """O3, or O1 where one static range cannot hold the activation (a few massive tokens set the range and
    every other token loses its precision), judged on calibration rows already divided by s with the
    weights already multiplied by it. Returns the level and the O3 and O1 relative errors.

    The same as `group_error` at O3 and at O1 with α None, sharing the FP outputs and quantized weights."""
    half = len(rows) // 2
    split = len(rows) >= 2
    fit, scored = (rows[:half], rows[half:]) if split else (rows, rows)
    fit_max = np.abs(fit).max(axis=0) if split else act_max
    ones = np.ones_like(act_max)
    static_max = static_range(search.calib_method, fit_max, fit) if split else float(np.max(act_max))
    x_static = quantize_activation_like(Level.O3, scored, static_max)
    x_token = quantize_activation_like(Level.O1, rows, 0.0)
    static_error = static_total = token_error = token_total = 0.0
    for weight, in_axis in weights:
        w = _columns(weight, in_axis)
        reference = rows @ w
        dequantized = _dequantized(w, ones, weight, in_axis, search)
        scored_reference = reference[half:] if split else reference
        static_error += float(np.sum((x_static @ dequantized - scored_reference) ** 2))
        static_total += float(np.sum(scored_reference ** 2))
        token_error += float(np.sum((x_token @ dequantized - reference) ** 2))
        token_total += float(np.sum(reference ** 2))
    static = static_error / max(static_total, 1e-30)
    per_token = token_error / max(token_total, 1e-30)
    return (Level.O1 if static > LEVEL_AUTO_RATIO * per_token else Level.O3), static, per_token
