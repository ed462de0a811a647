"""Linear layers: the MatMul and Gemm nodes with a constant 2-D weight that sqonnx smooths and quantizes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from sqonnx.graph.match import is_standard
from sqonnx.graph.tensors import FLOAT_TYPES, constant, constant_shape, is_constant


@dataclass(frozen=True)
class LinearLayer:
    """A MatMul or Gemm whose right-hand operand is a constant 2-D weight."""

    node: ir.Node
    # Axis of the weight that multiplies the activation's last axis: 0 for MatMul and Gemm(transB=0)
    # ([in, out] layout), 1 for Gemm(transB=1) ([out, in] layout).
    in_axis: int

    @property
    def name(self) -> str:
        return self.node.name or self.node.outputs[0].name

    @property
    def activation(self) -> ir.Value:
        value = self.node.inputs[0]
        assert value is not None
        return value

    @property
    def weight_value(self) -> ir.Value:
        value = self.node.inputs[1]
        assert value is not None
        return value

    @property
    def weight(self) -> np.ndarray:
        array = constant(self.weight_value)
        assert array is not None
        return array

    @property
    def weight_in_out(self) -> np.ndarray:
        """The weight as [in, out] (a view: Gemm(transB=1) stores [out, in]), as the quantizers round it."""
        weight = self.weight
        return weight if self.in_axis == 0 else weight.T

    @property
    def bias_value(self) -> ir.Value | None:
        return self.node.inputs[2] if self.node.op_type == "Gemm" and len(self.node.inputs) > 2 else None

    @property
    def shape(self) -> tuple[int, ...]:
        """The weight's shape, read without its data."""
        found = constant_shape(self.weight_value)
        assert found is not None
        return found[0]

    @property
    def in_channels(self) -> int:
        return self.shape[self.in_axis]

    @property
    def out_channels(self) -> int:
        return self.shape[1 - self.in_axis]


def as_linear_layer(node: ir.Node) -> LinearLayer | None:
    if not is_standard(node, "MatMul", "Gemm"):
        return None
    weight = constant_shape(node.inputs[1]) if len(node.inputs) > 1 else None
    if weight is None or len(weight[0]) != 2 or weight[1] not in FLOAT_TYPES:
        return None
    if node.op_type == "MatMul":
        return LinearLayer(node, in_axis=0)
    attrs = node.attributes
    if attrs.get_int("transA", 0) or attrs.get_float("alpha", 1.0) != 1.0:
        return None
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    if bias is not None and attrs.get_float("beta", 1.0) != 1.0:
        return None
    if bias is not None and not is_constant(bias):
        return None
    return LinearLayer(node, in_axis=1 if attrs.get_int("transB", 0) else 0)


def find_linear_layers(graph: ir.Graph) -> list[LinearLayer]:
    """Linear layers in graph order."""
    return [layer for node in graph if (layer := as_linear_layer(node)) is not None]


# What may sit between a language model's LM head and its `logits` output: casts, reshapes, a bias, Gemma 2's
# soft-capping (Div, Tanh, Mul by constants).
_TO_OUTPUT = {"Cast", "Identity", "Reshape", "Squeeze", "Unsqueeze", "Add", "Div", "Mul", "Tanh"}


def output_layer(graph: ir.Graph) -> LinearLayer | None:
    """The linear layer that computes the model's first output (a language model's LM head), if one does."""
    value: ir.Value | None = graph.outputs[0] if graph.outputs else None
    for _ in range(8):
        node = value.producer() if value is not None else None
        if node is None:
            return None
        layer = as_linear_layer(node)
        if layer is not None:
            return layer
        if node.op_type not in _TO_OUTPUT:
            return None
        varying = [v for v in node.inputs if v is not None and not is_constant(v)]
        if len(varying) != 1:
            return None
        value = varying[0]
    return None
