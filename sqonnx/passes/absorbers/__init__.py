"""Fold targets for 1/s, one module each, tried in this order (see `base.Absorber`).

Adding a family's pattern is one module with an `Absorber` subclass, and one line here.
"""

from sqonnx.passes.absorbers.base import Absorber, Probe, Site
from sqonnx.passes.absorbers.gqa import GroupQueryAttentionAbsorber
from sqonnx.passes.absorbers.linear import LinearAbsorber
from sqonnx.passes.absorbers.mul import MulAbsorber
from sqonnx.passes.absorbers.norm import NormAbsorber
from sqonnx.passes.absorbers.value import ValueAbsorber

ABSORBERS: tuple[type[Absorber], ...] = (NormAbsorber, MulAbsorber, LinearAbsorber, ValueAbsorber,
                                         GroupQueryAttentionAbsorber)

__all__ = ["ABSORBERS", "Absorber", "LinearAbsorber", "MulAbsorber", "NormAbsorber", "Probe", "Site",
           "ValueAbsorber"]
