"""Fold 1/s into the output columns of the linear layer that made X through per-channel ops.

If X = f(Z) with Z = A W (+ b) and f per-channel linear or positively homogeneous in Z, then
X / s = f(A (W / s) (+ b / s)). The cases that matter: Llama's down_proj reads up_proj(x) * SiLU(gate(x)),
so its s folds into up_proj (Phi-3: into the up half of the fused gate_up_proj); OPT's fc2 reads
ReLU(fc1(x)), so its s folds into fc1 (beyond the paper, exact because ReLU(x / s) = ReLU(x) / s, s > 0).
GELU and SiLU alone are not homogeneous: GPT-2's, BLOOM's or Falcon's FFN output layer has no exact
absorber and stays unsmoothed unless an explicit Mul pays (see `--unabsorbed`).
"""

from __future__ import annotations

from dataclasses import dataclass

from sqonnx.graph.match import Match, NoMatch
from sqonnx.passes.absorbers.base import Site
from sqonnx.passes.absorbers.columns import ColumnAbsorber, walk_to_linear

NOT_HOMOGENEOUS = ("Gelu", "Erf", "Tanh", "Sigmoid", "Softplus", "FastGelu", "BiasGelu", "QuickGelu")


@dataclass(frozen=True)
class LinearAbsorber(ColumnAbsorber):
    """The output columns of the linear layer that made X through per-channel ops (module docstring)."""

    @classmethod
    def match(cls, site: Site) -> Match[LinearAbsorber]:
        if site.producer is None:
            return NoMatch("")
        path = walk_to_linear(site.source, site.channels, attention=False)
        if path is None:
            return _why_not(site)
        return cls(path, site.source, site.channels)

    def describe(self) -> str:
        through = f" through {'/'.join(dict.fromkeys(self.path.passes))}" if self.path.passes else ""
        return f"{self.node.op_type} (output columns{through})"


def _why_not(site: Site) -> NoMatch:
    """Name the nonlinearity when X comes out of one (GELU as exported ends in Mul(0.5 x, 1 + Erf(..)) or a
    Tanh chain a few ops up)."""
    ops: set[str] = set()
    frontier = [site.producer]
    for _ in range(6):
        nodes = [node for node in frontier if node is not None]
        ops.update(node.op_type for node in nodes)
        frontier = [value.producer() for node in nodes for value in node.inputs
                    if value is not None and not value.is_initializer()]
    bad = sorted(ops & set(NOT_HOMOGENEOUS))
    if bad:
        return NoMatch(f"it is made by a nonlinearity ({', '.join(bad)}) that no per-channel factor passes "
                       "through exactly (GELU/SiLU FFN: no exact absorber)")
    return NoMatch("")
