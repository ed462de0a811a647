"""A weight format is how a planned layer is written: one module per format, one line in the registry
(`formats/__init__.py`). A format declares

- whether a run writes layers in it (`wanted`),
- its error model for the judgements: per layer, whether the layer takes it (`plan`: the layer as its insert pass
  takes it with the report's level, reason and error, or `NoMatch(reason)` and the next format is tried), and
  the block of its activation quantization the α search judges with (`search_block`),
- its yardstick for the quality check (`yardstick`: what onnxruntime's own quantizer would write),
- its insert pass (`insert`), run by `run.build.write_block` in registry order.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any

import numpy as np

from sqonnx.config import Level, QuantizeConfig
from sqonnx.graph.layers import LinearLayer
from sqonnx.graph.match import Match
from sqonnx.passes.quantizing import QuantizingPass


@dataclass(frozen=True)
class LayerContext:
    """What the planning step knows of a layer's group: its activation level, static range, why that level and its
    error on calibration rows, the rows divided by s, and X^T X divided by s on both sides (GPTQ)."""

    static_max: float
    level: Level
    why: str
    error: float | None
    smoothed_rows: np.ndarray | None
    hessian: np.ndarray | None


@dataclass(frozen=True)
class Planned:
    """One layer as a format writes it: `item` is what its insert pass takes; the report's level, reason, error."""

    format: WeightFormat
    item: Any
    level: str
    reason: str
    error: float | None

    @property
    def layer(self) -> LinearLayer:
        return self.item.layer


class WeightFormat(abc.ABC):
    name: str
    bits: int  # of the weights

    @abc.abstractmethod
    def wanted(self, config: QuantizeConfig) -> bool:
        """Whether this run writes layers in this format."""

    @abc.abstractmethod
    def plan(self, layer: LinearLayer, context: LayerContext, config: QuantizeConfig) -> Match[Planned]:
        """`layer` in this format, or NoMatch(why not) for the next format to take it."""

    @abc.abstractmethod
    def insert(self, items: list[Any], config: QuantizeConfig, opset: int) -> QuantizingPass:
        """The pass that writes `items` (what `plan` returned) into a block."""

    def search_block(self, config: QuantizeConfig) -> int:
        """The α search's W4A8 block (0: INT8 at the run's level)."""
        return 0

    @abc.abstractmethod
    def yardstick(self) -> str:
        """The quality check's yardstick: the same layers unsmoothed, rounded to nearest, in this format."""
