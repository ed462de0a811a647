"""Symmetric linear quantization, in numpy: the one definition of INT8 codes, scales and fake quantization that
the passes write and the error models judge with, and of the activation levels and range methods they take."""

from __future__ import annotations

import enum

import numpy as np

from sqonnx.math.smoothing import input_channel_max


class Level(str, enum.Enum):
    """SmoothQuant levels (paper, Table 2): how activations are quantized. Faster down the list."""

    O1 = "O1"  # dynamic per-token: one scale per row, computed at run time
    O2 = "O2"  # dynamic per-tensor: one scale per activation tensor, computed at run time
    O3 = "O3"  # static per-tensor: one scale per activation, fixed by calibration

    @property
    def activations(self) -> str:
        return {"O1": "int8 dynamic per-token (symmetric)", "O2": "uint8 dynamic per-tensor (asymmetric)",
                "O3": "int8 static per-tensor (symmetric, min-max calibrated)"}[self.value]


class CalibMethod(str, enum.Enum):
    """How O3's static activation range is chosen from calibration data."""

    MINMAX = "minmax"  # the largest |x| seen: nothing clips
    PERCENTILE = "percentile"  # the 99.99th percentile of |x|: rare outliers clip
    MSE = "mse"  # the clipping threshold with the least squared quantization error


# Activations are symmetric int8 in [-127, 127] (-128 unused: the codes negate exactly).
ACTIVATION_QMAX = 127


def symmetric_scale(max_abs: np.ndarray | float, qmax: int) -> np.ndarray:
    """Scale of symmetric linear quantization onto [-qmax, qmax]; never zero."""
    m = np.asarray(max_abs, dtype=np.float32)
    return np.where(m > 0, m / np.float32(qmax), np.float32(1.0)).astype(np.float32)


def quantize_symmetric(values: np.ndarray, scale: np.ndarray, qmax: int) -> np.ndarray:
    """Round-to-nearest-even int8 codes in [-qmax, qmax], as QuantizeLinear rounds (float32, in place on one
    scratch array: a 4096 x 11008 weight makes one copy, not five)."""
    q = np.divide(values, np.asarray(scale, np.float32), dtype=np.float32)
    np.rint(q, out=q)
    np.clip(q, -qmax, qmax, out=q)
    return q.astype(np.int8)


def quantize_weight(weight: np.ndarray, in_axis: int, qmax: int, per_channel: bool) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 codes and scale of a 2-D weight: one scale per output channel, or one in all."""
    if per_channel:
        scale = symmetric_scale(input_channel_max(weight, 1 - in_axis), qmax)  # max |w| per output channel
        return quantize_symmetric(weight, np.expand_dims(scale, in_axis), qmax), scale
    scale = symmetric_scale(max(float(weight.max()), -float(weight.min())), qmax)
    return quantize_symmetric(weight, scale, qmax), scale


def fake_quant(x: np.ndarray, scale: float | np.ndarray, qmax: int = ACTIVATION_QMAX) -> np.ndarray:
    """x rounded onto the symmetric grid of `scale` (to nearest even, as QuantizeLinear) and back, in x's dtype."""
    return np.clip(np.rint(x / scale), -qmax, qmax) * scale
