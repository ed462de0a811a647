"""The run's decisions that need the whole model's evidence, each made by one function here.

The pipeline gathers the evidence as it builds the blocks (tracks of the calibration pass, staged candidates);
these functions decide on it. What each looked at is kept with the decision and reaches the report and the
metadata (`run.plan.Plan`).

- `choose_alpha`: --alpha auto, per-group α against single values, by the output error on held-back samples.
- `judge_head`: the LM head INT8 or float, by the check's loss with it each way (quality.HeadVerdict).
- `keep_float_done`: --keep-float-budget's doubling stops once the loss fits the budget, or half the layers are float
  (the pipeline then halves the gap to the last count that did not fit).
- `decide_rotation`: the residual-stream rotation kept or declined, by the INT8 error of the groups reading the
  stream rotated and without it (quality.RotationVerdict).
"""

from __future__ import annotations

from dataclasses import dataclass

from sqonnx.config import QuantizeConfig
from sqonnx.judgements.quality import HeadVerdict, RotationVerdict, rotation_verdict
from sqonnx.streaming.runner import Comparison


def choose_alpha(errors: list[float]) -> int:
    """The index of the candidate (the per-group choice first, then the single values) with the smallest output
    error on the held-back samples; the first one on a tie."""
    return errors.index(min(errors))


def judge_head(layers: frozenset[str], int8: Comparison, float_head: Comparison, kind: str) -> HeadVerdict:
    """The LM head's verdict from the check's samples through the model with it quantized (`int8`) and float."""
    return HeadVerdict(layers, int8.quality_loss, float_head.quality_loss, float_head.language_model, kind)


def keep_float_done(loss: float, budget: float, floated: int, layers: int) -> bool:
    """Whether --keep-float-budget's doubling search stops: the loss fits, or half the layers are float already."""
    return loss <= budget or floated >= layers // 2


@dataclass(frozen=True)
class RotationDecision:
    """The rotation as judged (None: nothing to judge: not rotated, or no group reads the stream) and whether the run
    declines it (the default only: an explicit --rotate keeps it and warns)."""

    verdict: RotationVerdict | None
    declined: bool


def decide_rotation(config: QuantizeConfig, errors: dict[str, tuple[float, float]]) -> RotationDecision:
    verdict = rotation_verdict(errors)
    return RotationDecision(verdict, config.rotate is None and verdict is not None and verdict.loses)
