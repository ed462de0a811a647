"""How planned layers are written: one module per weight format, one line in the registry below.

The registry's order is the order formats are tried for a layer (the first wanted one whose error model takes it)
and the order their insert passes run."""

from __future__ import annotations

from sqonnx.config import QuantizeConfig
from sqonnx.formats.base import LayerContext, Planned, WeightFormat
from sqonnx.formats.int8 import Int8Integer, Int8QDQ
from sqonnx.formats.nbits import NBITS_LEVELS, W4A8, Int4NBits, Int8Blocks, NBits

FORMATS: tuple[WeightFormat, ...] = (Int4NBits(), Int8Blocks(), Int8Integer(), Int8QDQ())

__all__ = ["FORMATS", "NBITS_LEVELS", "W4A8", "NBits", "LayerContext", "Planned", "WeightFormat", "primary"]


def primary(config: QuantizeConfig) -> WeightFormat:
    """The run's first choice of format: what the α search judges and the quality check's yardstick is written in."""
    return next(fmt for fmt in FORMATS if fmt.wanted(config))
