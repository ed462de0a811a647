"""Weight formats are plug-ins (sqonnx/formats): one module each, one registry line. The registry's order is the
order formats are tried for a layer and their insert passes run; each format's error model decides whether a layer
takes it, with a reason when not."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from sqonnx import Level, QuantizeConfig, Target, Weights
from sqonnx.formats import FORMATS, LayerContext, primary
from sqonnx.formats.nbits import W4A8
from sqonnx.graph.layers import as_linear_layer
from sqonnx.graph.match import NoMatch
from sqonnx.math.search import INT4_ERROR_LIMIT


def _layer(weight: np.ndarray) -> object:
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1, weight.shape[0]]))
    w = ir.Value(name="w", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(weight.shape),
                 const_value=ir.tensor(weight, name="w"))
    node = ir.node("MatMul", [x, w], name="mm", outputs=[ir.Value(name="y")])
    ir.Graph([x], node.outputs, nodes=[node], initializers=[w], opset_imports={"": 18})
    layer = as_linear_layer(node)
    assert layer is not None
    return layer


def _context(rows: np.ndarray, level: Level = Level.O3) -> LayerContext:
    return LayerContext(float(np.abs(rows).max()), level, "why", 0.01, rows, None)


def _first(layer: object, context: LayerContext, config: QuantizeConfig) -> tuple[str, list[str]]:
    declined = []
    for fmt in FORMATS:
        planned = fmt.plan(layer, context, config) if fmt.wanted(config) else NoMatch("")
        if not isinstance(planned, NoMatch):
            return planned.format.name, declined
        declined.append(planned.reason)
    raise AssertionError("no format")


def test_registry_order_and_yardsticks() -> None:
    assert [fmt.name for fmt in FORMATS] == ["int4 MatMulNBits", "int8 MatMulNBits", "int8 integer ops", "int8 Q/DQ"]
    assert primary(QuantizeConfig()).yardstick() == "unsmoothed W8A8"
    assert primary(QuantizeConfig(weights=Weights.INT4)).yardstick() == "unsmoothed W4A8 (round to nearest)"
    assert primary(QuantizeConfig(weights=Weights.INT4)).search_block(QuantizeConfig(int4_block=64)) == 64
    assert primary(QuantizeConfig()).search_block(QuantizeConfig()) == 0
    blocks = QuantizeConfig(weights=Weights.INT8_BLOCKS)
    assert primary(blocks).yardstick() == "unsmoothed W8A8 blocks (round to nearest)"
    assert primary(blocks).search_block(blocks) == 0


@pytest.mark.parametrize(("config", "level", "expected"), [
    (QuantizeConfig(), Level.O3, "int8 Q/DQ"),
    (QuantizeConfig(), Level.O1, "int8 integer ops"),  # per-token scales have no Q/DQ spelling
    (QuantizeConfig(target=Target.CUDA), Level.O3, "int8 integer ops"),  # the target's row: no fused kernel
    (QuantizeConfig(weights=Weights.INT4), Level.O3, "int4 MatMulNBits"),
    (QuantizeConfig(weights=Weights.INT8_BLOCKS), Level.O3, "int8 MatMulNBits"),
])
def test_each_layer_takes_the_first_format_that_takes_it(config: QuantizeConfig, level: Level, expected: str) -> None:
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((64, 32)).astype(np.float32) * 0.05
    name, _ = _first(_layer(weight), _context(rng.standard_normal((16, 64)).astype(np.float32), level), config)
    assert name == expected


def test_int4_declines_with_its_error_and_int8_takes_the_layer() -> None:
    """A weight 4 bits break: one huge input row per block sets every block's step, and the activations never use it,
    so the output rests on the small weights 4 bits round to zero. W4A8's error on the rows is over INT4_ERROR_LIMIT,
    the layer stays INT8, and the reason names the error."""
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((64, 32)).astype(np.float32) * 0.01
    weight[::32] = 10.0
    rows = rng.standard_normal((16, 64)).astype(np.float32)
    rows[:, ::32] = 0.0
    config = QuantizeConfig(weights=Weights.INT4, weight_rounding=None)
    layer = _layer(weight)
    int4 = FORMATS[0].plan(layer, _context(rows), config)
    assert isinstance(int4, NoMatch) and int4.reason.startswith("W4A8 error ")
    assert float(int4.reason.split()[2]) > INT4_ERROR_LIMIT
    name, declined = _first(layer, _context(rows), config)
    assert name == "int8 Q/DQ" and declined[0] == int4.reason
    ordinary = FORMATS[0].plan(_layer(rng.standard_normal((64, 32)).astype(np.float32) * 0.05), _context(rows),
                               config)
    assert not isinstance(ordinary, NoMatch) and ordinary.level == W4A8 and ordinary.error < INT4_ERROR_LIMIT
