"""SmoothQuant math, in numpy and nothing else (no graph code here).

For Y = X W with per-input-channel maxima a_j = max|X_j| and w_j = max_k |W_jk| (taken over every
weight that reads X, so siblings share one s), the paper (Xiao et al. 2023, eq. 4) picks

    s_j = a_j^alpha / w_j^(1 - alpha)

and rewrites Y = (X / s) (s W). We use this formula as published (llm-compressor uses a variant).
Both maxima are clamped at 1e-5 as the reference implementation does, so a channel that is always zero
gets a finite s and the fold stays exact.
"""

from __future__ import annotations

import numpy as np

EPS = 1e-5


def as_float32(array: np.ndarray) -> np.ndarray:
    """`array` in float32 (itself when it already is); see `convert`."""
    return convert(array, np.dtype(np.float32))


def convert(array: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """`array` in `dtype` (itself when it already is). Between float16 and float32 numpy 2.4 converts two to six
    times faster through a ufunc than through `astype` (float16 -> float32 of a 4096 x 11008 weight: 0.08 s
    against 0.5 s), with the same rounding."""
    if array.dtype == dtype:
        return array
    if {array.dtype, np.dtype(dtype)} <= {np.dtype(np.float16), np.dtype(np.float32)}:
        return np.positive(array, dtype=dtype)
    return array.astype(dtype)


def smoothing_scales(act_max: np.ndarray, weight_max: np.ndarray, alpha: float) -> np.ndarray:
    """Per-channel s (float32, shape [C]) from activation and weight maxima."""
    a = np.maximum(np.asarray(act_max, dtype=np.float64), EPS)
    w = np.maximum(np.asarray(weight_max, dtype=np.float64), EPS)
    s = np.power(a, alpha) / np.power(w, 1.0 - alpha)
    s = np.maximum(s, EPS)
    return s.astype(np.float32)


def input_channel_max(weight: np.ndarray, channel_axis: int) -> np.ndarray:
    """max|W| per input channel; `channel_axis` is the axis that multiplies X's last axis."""
    other = 1 - channel_axis
    weight = as_float32(weight)  # numpy reduces float16 / bfloat16 without SIMD, ten times slower
    # max(max, -min) instead of max(abs): two reductions, no copy of the weight
    return np.maximum(weight.max(axis=other), -weight.min(axis=other))


def group_weight_max(weights: list[tuple[np.ndarray, int]]) -> np.ndarray:
    """max|W| per input channel over every (weight, in_axis) that reads one activation: siblings share one s."""
    return np.max([input_channel_max(weight, axis) for weight, axis in weights], axis=0)


def outlier_ratio(channel_max: np.ndarray) -> float:
    """max / median of per-channel maxima: how far the largest channel stands out (1.0 for an all-zero tensor,
    which has no outlier)."""
    median = float(np.median(channel_max))
    return float(channel_max.max()) / median if median > 0 else float("inf") if channel_max.max() > 0 else 1.0


def along(factors: np.ndarray, axis: int) -> np.ndarray:
    """Per-channel factors shaped to broadcast along `axis` of a 2-D weight (rows: 0, columns: 1)."""
    shape = [1, 1]
    shape[axis] = factors.shape[0]
    return factors.reshape(shape)


def shared_scales(act_max: np.ndarray, weight_max: np.ndarray, alpha: float, shared: np.ndarray | None) -> np.ndarray:
    """s per channel; channels with the same `shared` label (query heads reading one value head) get the
    factor of their pooled maxima, since one value column divides them all."""
    if shared is None:
        return smoothing_scales(act_max, weight_max, alpha)
    labels, inverse = np.unique(shared, return_inverse=True)
    pooled_act = np.zeros(len(labels), np.float32)
    pooled_weight = np.zeros(len(labels), np.float32)
    np.maximum.at(pooled_act, inverse, act_max)
    np.maximum.at(pooled_weight, inverse, weight_max)
    return smoothing_scales(pooled_act, pooled_weight, alpha)[inverse]
