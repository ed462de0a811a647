"""onnxruntime's MatMulNBits: weight blocks along the input channels with int8 activations per row and block in the
kernel (accuracy_level 4). W4A8: 4-bit blocks, GPTQ-rounded by default (--weights int4); W8A8 blocks: 8-bit blocks,
rounded to nearest (--weights int8-blocks, the decode stage of --decode-weights int8-blocks). A layer takes it where
its error on calibration rows is within INT4_ERROR_LIMIT (search.w4a8_error); else it stays W8A8 (the INT8 GEMM), and
the report says why."""

from __future__ import annotations

from typing import Any

from sqonnx.config import QuantizeConfig, Weights
from sqonnx.formats.base import LayerContext, Planned, WeightFormat
from sqonnx.graph.layers import LinearLayer
from sqonnx.graph.match import Match, NoMatch
from sqonnx.math.gptq import Grid, round_weight
from sqonnx.math.search import INT4_ERROR_LIMIT, w4a8_error
from sqonnx.passes.insert_matmul_nbits import InsertMatMulNBitsPass, NBitsLayer

# A layer's level in the report when it is written as MatMulNBits (its kernel quantizes the activations).
W4A8 = "W4A8"
W8A8_BLOCKS = "W8A8 blocks"
NBITS_LEVELS = (W4A8, W8A8_BLOCKS)


class NBits(WeightFormat):
    """MatMulNBits with `bits`-bit blocks of --int4-block input channels, for --weights `weights`; `level`: the
    report's level of its layers, and what the format says it breaks."""

    weights: Weights
    level: str
    breaks: str

    def wanted(self, config: QuantizeConfig) -> bool:
        return config.weights is self.weights

    def grid(self, config: QuantizeConfig) -> Grid:
        raise NotImplementedError

    def plan(self, layer: LinearLayer, context: LayerContext, config: QuantizeConfig) -> Match[Planned]:
        weight = layer.weight_in_out
        rounded = round_weight(weight, self.grid(config), context.hessian, config.act_order)
        rows = context.smoothed_rows
        error = 0.0 if rows is None else w4a8_error(rows, weight, rounded, config.int4_block)
        if error > INT4_ERROR_LIMIT:
            return NoMatch(f"{self.level} error {error:.2g} on calibration rows (limit {INT4_ERROR_LIMIT})")
        return Planned(self, NBitsLayer(layer, rounded, self.bits), self.level,
                       f"{self.level} error {error:.2g} on calibration rows", error)

    def insert(self, items: list[Any], config: QuantizeConfig, opset: int) -> InsertMatMulNBitsPass:
        return InsertMatMulNBitsPass(items)

    def search_block(self, config: QuantizeConfig) -> int:
        return config.int4_block

    def yardstick(self) -> str:
        return f"unsmoothed {self.level} (round to nearest)"


class Int4NBits(NBits):
    name = "int4 MatMulNBits"
    bits = 4
    weights = Weights.INT4
    level = W4A8
    breaks = "4 bits"

    def grid(self, config: QuantizeConfig) -> Grid:
        return Grid.int4(config.int4_block)


class Int8Blocks(NBits):
    name = "int8 MatMulNBits"
    bits = 8
    weights = Weights.INT8_BLOCKS
    level = W8A8_BLOCKS
    breaks = "8-bit blocks"

    def grid(self, config: QuantizeConfig) -> Grid:
        return Grid.int8_blocks(config.int4_block)

    def search_block(self, config: QuantizeConfig) -> int:
        return 0  # the α search judges the INT8 error at the run's level: 8-bit blocks are closer to it than 4-bit
