"""What every pass that quantizes layers promises: it is given float layers of the model it runs on, and leaves
none of them float (onnx-ir's requires / ensures, checked around each run)."""

from __future__ import annotations

import onnx_ir as ir

from sqonnx.graph.layers import LinearLayer, as_linear_layer


class QuantizingPass(ir.passes.InPlacePass):
    """Base of the insert passes: `layers` are the layers the run's plan gave it."""

    def __init__(self, layers: list[LinearLayer]) -> None:
        super().__init__()
        self.layers = layers

    def requires(self, model: ir.Model) -> None:
        stray = [layer.name for layer in self.layers
                 if layer.node.graph is not model.graph or as_linear_layer(layer.node) is None]
        if stray:
            raise ir.passes.PreconditionError(f"not float layers of this graph: {', '.join(stray[:3])}")

    def ensures(self, model: ir.Model) -> None:
        left = [layer.name for layer in self.layers
                if layer.node.graph is not None and as_linear_layer(layer.node) is not None]
        if left:
            raise ir.passes.PostconditionError(f"left float: {', '.join(left[:3])}")
