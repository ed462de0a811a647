"""Normalize an exported graph before any analysis, the same way for every copy that is loaded.

Exports deduplicate identical initializers and read some of them through Identity nodes (every norm
of a freshly initialized model holds the same ones; OPT's fc biases), and some exporters keep large
constants in Constant nodes. Matching a linear layer's weight or a norm's scale needs a plain
initializer, so Constant nodes are lifted to initializers and Identity nodes removed (onnx-ir's own
passes). A constant that ends up shared is copied before any fold changes it for one reader
(`graph.set_constant_input`). The passes are deterministic, so calibration statistics keyed by value
name stay valid for every copy prepared this way. A weight read through Transpose(constant) (a tied LM
head) becomes a constant of its own (`passes/transposed.py`). Every value gets an element type
(`passes/dtypes.py`), so that any block of the graph runs as a model of its own.
"""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from sqonnx.passes.dtypes import InferDtypesPass
from sqonnx.passes.transposed import FoldTransposedConstantsPass


def prepare(model: ir.Model) -> ir.Model:
    ir.passes.Sequential(
        common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common_passes.IdentityEliminationPass(),
        FoldTransposedConstantsPass(),
        InferDtypesPass(),
    )(model)
    return model
