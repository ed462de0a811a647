"""What a pattern match returns when the graph is not what it looks for: a reason, never a bare string.

Matchers return the thing they found or `NoMatch(reason)` (onnxscript's `MatchResult.fail(reason)` in a
smaller shape): the reason reaches the report ("not smoothed: ...", "not rotated: ...") and a caller tells the two
apart by type, so a found name that happens to be a string is never taken for a failure.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

import onnx_ir as ir

T = TypeVar("T")

# The standard ONNX domain, as exporters spell it: "" (most) or "ai.onnx" (some builders).
STANDARD_DOMAINS = ("", "ai.onnx")


@dataclass(frozen=True)
class NoMatch:
    """The graph does not have the pattern; `reason` says what was found instead."""

    reason: str

    def __bool__(self) -> bool:
        return False


Match = T | NoMatch  # noqa: UP040 (a generic alias that older Pythons can subscript)


def is_standard(node: ir.Node, *op_types: str) -> bool:
    """Whether `node` is a standard-domain op (of one of `op_types`, when given)."""
    return node.domain in STANDARD_DOMAINS and (not op_types or node.op_type in op_types)
