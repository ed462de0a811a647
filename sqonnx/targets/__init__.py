"""Where a quantized model runs: one row of rules per target (`rules.TargetRules`), each in its module.

The registry below is the one list of targets; everything that depends on the target asks `rules_of(target)`.
"""

from __future__ import annotations

from sqonnx.targets import cpu, cuda, tensorrt
from sqonnx.targets.cpu import INT16_MAX, detect_native, worst_int16_pair, worst_int16_pair_in_graph
from sqonnx.targets.rules import Target, TargetRules

REGISTRY: dict[Target, TargetRules] = {row.target: row for row in (*cpu.ROWS, tensorrt.RULES, cuda.RULES)}

__all__ = ["INT16_MAX", "REGISTRY", "Target", "TargetRules", "detect_native", "full_range_is_safe", "resolve",
           "rules_of", "static_only", "worst_int16_pair", "worst_int16_pair_in_graph"]


def resolve(target: Target) -> Target:
    """`native` as the running CPU; any other target as it is."""
    return detect_native() if target is Target.NATIVE else target


def rules_of(target: Target) -> TargetRules:
    return REGISTRY[resolve(target)]


def full_range_is_safe(target: Target) -> bool:
    return rules_of(target).full_range


def static_only(target: Target) -> bool:
    """Targets whose runtime has no per-token (O1) or dynamic form: every group is static there, and the layers where
    static INT8 costs more than `QuantizeConfig.float_budget` stay float."""
    return rules_of(target).static_only
