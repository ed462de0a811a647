"""INT8 weights (symmetric, per output channel by default; GPTQ-rounded with --weight-rounding gptq), in two
spellings: Q/DQ pairs around the float op, which onnxruntime fuses into MatMulIntegerToFloat, and explicit integer
ops (QuantizeLinear / the per-token chain -> MatMulInteger -> Cast -> Mul), which O1 layers always take (per-token
scales have no Q/DQ spelling), and every layer with --format qoperator or a target with no fused kernel."""

from __future__ import annotations

from typing import Any

from sqonnx.config import Level, QuantizeConfig
from sqonnx.formats.base import LayerContext, Planned, WeightFormat
from sqonnx.graph.layers import LinearLayer
from sqonnx.graph.match import Match, NoMatch
from sqonnx.math.gptq import Grid, round_weight
from sqonnx.passes.insert_integer_matmul import InsertIntegerMatMulPass
from sqonnx.passes.insert_qdq import InsertQDQPass, LayerQuantization
from sqonnx.passes.quantizing import QuantizingPass
from sqonnx.targets import rules_of


def _planned(fmt: WeightFormat, layer: LinearLayer, context: LayerContext, config: QuantizeConfig) -> Planned:
    weight = layer.weight_in_out
    rounded = round_weight(weight, Grid.int8(config.weight_qmax), context.hessian, config.act_order) \
        if context.hessian is not None and config.per_channel else None
    return Planned(fmt, LayerQuantization(layer, context.static_max, context.level, rounded), context.level.value,
                   context.why, context.error)


def _integer(config: QuantizeConfig, level: Level) -> bool:
    return config.integer_form or level is Level.O1


class _Int8(WeightFormat):
    """INT8 weights; a layer takes the spelling its level and the run ask for (`integer`)."""

    bits = 8
    integer: bool

    def wanted(self, config: QuantizeConfig) -> bool:
        return True

    def plan(self, layer: LinearLayer, context: LayerContext, config: QuantizeConfig) -> Match[Planned]:
        if _integer(config, context.level) is not self.integer:
            return NoMatch("")
        return _planned(self, layer, context, config)

    def yardstick(self) -> str:
        return "unsmoothed W8A8"


class Int8Integer(_Int8):
    name = "int8 integer ops"
    integer = True

    def insert(self, items: list[Any], config: QuantizeConfig, opset: int) -> QuantizingPass:
        return InsertIntegerMatMulPass(items, config.weight_qmax, config.per_channel, config.level, opset,
                                       signed=rules_of(config.target).signed)


class Int8QDQ(_Int8):
    name = "int8 Q/DQ"
    integer = False

    def insert(self, items: list[Any], config: QuantizeConfig, opset: int) -> QuantizingPass:
        return InsertQDQPass(items, config.weight_qmax, config.per_channel)
