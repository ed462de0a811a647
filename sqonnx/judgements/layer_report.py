"""What a run decided and measured for one linear layer (the report's rows)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class LayerReport:
    name: str
    activation: str
    quantized: bool
    smoothing: str  # producer kind that absorbed 1/s, "explicit Mul", or "not smoothed: <why>"
    folded_into: str
    scale_min: float | None
    scale_max: float | None
    activation_max_before: float  # max over channels of max|X_j|
    activation_max_after: float  # max over channels of max|X_j / s_j|: the static range that is used
    outlier_ratio_before: float  # max / median of the per-channel maxima
    outlier_ratio_after: float
    alpha: float | None = None  # the group's α (differs per layer with --alpha auto)
    static_range: float = 0.0  # O3: the max |x| the static scale covers (after smoothing and clipping)
    level: str = ""  # the layer's activation quantization (differs per layer with --level auto)
    level_reason: str = ""  # why --level auto chose it
    row_error: float | None = None  # relative INT8 error of the group at its level on calibration rows (--level auto)
