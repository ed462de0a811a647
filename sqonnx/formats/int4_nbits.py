"""W4A8: onnxruntime's MatMulNBits, 4-bit weight blocks (GPTQ-rounded by default) with int8 activations per block in
the kernel (accuracy_level 4). A layer takes it where its W4A8 error on calibration rows is within INT4_ERROR_LIMIT
(search.w4a8_error); else it stays W8A8, and the report says why."""

from __future__ import annotations

from typing import Any

from sqonnx.config import QuantizeConfig, Weights
from sqonnx.formats.base import LayerContext, Planned, WeightFormat
from sqonnx.graph.layers import LinearLayer
from sqonnx.graph.match import Match, NoMatch
from sqonnx.math.gptq import Grid, round_weight
from sqonnx.math.search import INT4_ERROR_LIMIT, w4a8_error
from sqonnx.passes.insert_matmul_nbits import InsertMatMulNBitsPass, NBitsLayer

W4A8 = "W4A8"  # a layer's level in the report when it is written as MatMulNBits (its kernel quantizes activations)


class Int4NBits(WeightFormat):
    name = "int4 MatMulNBits"
    bits = 4

    def wanted(self, config: QuantizeConfig) -> bool:
        return config.weights is Weights.INT4

    def plan(self, layer: LinearLayer, context: LayerContext, config: QuantizeConfig) -> Match[Planned]:
        weight = layer.weight_in_out
        four = round_weight(weight, Grid.int4(config.int4_block), context.hessian, config.act_order)
        rows = context.smoothed_rows
        error = 0.0 if rows is None else w4a8_error(rows, weight, four, config.int4_block)
        if error > INT4_ERROR_LIMIT:
            return NoMatch(f"W4A8 error {error:.2g} on calibration rows (limit {INT4_ERROR_LIMIT})")
        return Planned(self, NBitsLayer(layer, four), W4A8, f"W4A8 error {error:.2g} on calibration rows", error)

    def insert(self, items: list[Any], config: QuantizeConfig, opset: int) -> InsertMatMulNBitsPass:
        return InsertMatMulNBitsPass(items)

    def search_block(self, config: QuantizeConfig) -> int:
        return config.int4_block

    def yardstick(self) -> str:
        return "unsmoothed W4A8 (round to nearest)"
