import numpy as np
import pytest

from sqonnx.math.quant import quantize_symmetric, symmetric_scale
from sqonnx.math.smoothing import input_channel_max, smoothing_scales


def test_scales_follow_the_paper_formula() -> None:
    act = np.array([100.0, 1.0, 4.0])
    weight = np.array([0.5, 2.0, 1.0])
    s = smoothing_scales(act, weight, alpha=0.5)
    np.testing.assert_allclose(s, np.sqrt(act) / np.sqrt(weight), rtol=1e-6)
    # After smoothing, max|X/s| and max|W*s| meet at sqrt(a*w) per channel (alpha = 0.5).
    np.testing.assert_allclose(act / s, weight * s, rtol=1e-6)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.8, 1.0])
def test_scales_are_finite_for_zero_channels(alpha: float) -> None:
    s = smoothing_scales(np.array([0.0, 5.0]), np.array([1.0, 0.0]), alpha)
    assert np.all(np.isfinite(s)) and np.all(s > 0)


def test_input_channel_max_respects_layout() -> None:
    w = np.array([[1.0, -3.0], [2.0, 0.5], [-4.0, 1.0]])  # [in=3, out=2]
    np.testing.assert_array_equal(input_channel_max(w, 0), [3.0, 2.0, 4.0])
    np.testing.assert_array_equal(input_channel_max(w.T, 1), [3.0, 2.0, 4.0])


def test_symmetric_quantization_round_trip() -> None:
    values = np.linspace(-2.0, 2.0, 101, dtype=np.float32)
    scale = symmetric_scale(2.0, 127)
    codes = quantize_symmetric(values, scale, 127)
    assert codes.min() == -127 and codes.max() == 127
    assert np.abs(codes * scale - values).max() <= scale / 2 + 1e-7
    assert symmetric_scale(0.0, 127) == 1.0  # never a zero scale
