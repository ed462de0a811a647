"""What every fold target (absorber) is: the interface, the place it is matched, and small graph helpers.

An absorber is the node that produced a smoothing group's activation X and can take 1/s into its own
constants, so that X/s comes out of it exactly and the runtime graph gains no op. Each kind lives in
one module of this package and is listed in `ABSORBERS` (`__init__.py`); `find_smoothing_groups` tries
them in order. A kind says:

* `match(site)`: an absorber for this site, or `NoMatch(reason)` (reason "" when its pattern does not apply);
* `channel_statistics()` / `probe()`: what calibration must measure besides X (a value to bound-check,
  a channel map to read off the running model);
* `factor_map(stats)`: which channels of X must share one factor (grouped-query attention: the query
  heads that read one value head), `check(act_max, stats)`: a last reason to refuse, from calibration;
* `fold(graph, scales, stats)`: divide its constants by s, exactly; `describe()`: one phrase for the report.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from sqonnx.calibrators.probes import Probe
from sqonnx.graph.match import Match, is_standard
from sqonnx.graph.tensors import FLOAT_TYPES, constant

if TYPE_CHECKING:
    from sqonnx.calibrators import ActivationStats

# Readers of only the shape of a value: scaling the value changes nothing they compute.
SHAPE_ONLY_OPS = ("Shape", "Size")


@dataclass(frozen=True)
class Site:
    """Where a group's activation comes from.

    `activation` is X as the group's linear layers read it; `source` is the same numbers before any
    Reshape that only flattens the leading (token) axes (GPT-2 and OPT feed 2-D Gemms through
    Reshape([-1, C])); an absorber matches the producer of `source`.
    """

    activation: ir.Value
    source: ir.Value
    channels: int

    @property
    def producer(self) -> ir.Node | None:
        return self.source.producer()


class Absorber(abc.ABC):
    """One fold target; see the module docstring."""

    @classmethod
    @abc.abstractmethod
    def match(cls, site: Site) -> Match[Absorber]:
        """An absorber for `site`, or `NoMatch(why not)` (reason "" when the pattern does not apply at all: the
        next kind is tried and nothing is reported)."""

    @property
    @abc.abstractmethod
    def node(self) -> ir.Node:
        """The node whose constants take 1/s (named in the report as `folded_into`)."""

    def channel_statistics(self) -> dict[str, int]:
        """Values (name -> channels) whose per-channel max|x| calibration must also measure."""
        return {}

    def probe(self) -> Probe | None:
        return None

    def factor_map(self, stats: ActivationStats) -> np.ndarray | None:
        """Channel c of X shares its factor with every channel of the same map value; None: none shared."""
        return None

    def check(self, act_max: np.ndarray, stats: ActivationStats) -> str:
        """A reason not to fold, found in calibration data ("" to go ahead)."""
        return ""

    @abc.abstractmethod
    def fold(self, graph: ir.Graph, scales: np.ndarray, stats: ActivationStats) -> None:
        """Divide this node's constants by `scales` (per channel of X) so that it produces X / s."""

    @abc.abstractmethod
    def describe(self) -> str:
        """How 1/s was absorbed, for the report (e.g. 'LayerNormalization', 'MatMul (value columns)')."""


def value_uses(value: ir.Value) -> list:  # list[onnx_ir Usage]
    """Readers of a value's numbers; Shape and Size read only its shape, which scaling keeps."""
    return [use for use in value.uses() if not is_standard(use.node, *SHAPE_ONLY_OPS)]


def is_channel_vector(node: ir.Node, index: int, channels: int, *, allow_scalar: bool = False) -> bool:
    """Whether input `index` is a float constant that varies (at most) along the last axis only."""
    if index >= len(node.inputs) or node.inputs[index] is None:
        return False
    array = constant(node.inputs[index])
    if array is None or array.dtype not in FLOAT_TYPES:
        return False
    if array.ndim == 0:
        return allow_scalar
    if any(d != 1 for d in array.shape[:-1]):
        return False
    return array.shape[-1] == channels or (allow_scalar and array.shape[-1] == 1)


def single_reader(value: ir.Value) -> bool:
    """Scaling `value` changes nothing but its one reader."""
    return len(value_uses(value)) == 1 and not value.is_graph_output()
