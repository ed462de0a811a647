"""The quality check every run makes, and the floor below which no model is written.

A quantized model can pass onnx.checker, the kernel check and the report and still be wrecked (a real Gemma 3
with its run-time rotations: perplexity 29x FP32). So every run sends a few samples the statistics have not seen
through the FP model and the model it writes, block by block like calibration, and measures the loss: the
perplexity ratio for a language model (a `logits` output and `input_ids`), else 1 - cosine of the first
output. Plain W8A8 (no smoothing) runs on the same samples beside it, so the number has a yardstick. A model
far out of line (PERPLEXITY_FLOOR, COSINE_FLOOR) is an error unless `--allow-lossy`; one that loses more than
plain W8A8, by more than the check's own noise (`loss_noise`), is a warning.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np

from sqonnx.errors import SqonnxError
from sqonnx.judgements.layer_report import LayerReport
from sqonnx.math.rotation import Orthogonal, orthogonal
from sqonnx.passes.rotate import RotationResult

# A language model whose perplexity grows beyond this factor, or an encoder whose outputs' cosine to the FP
# model's falls below COSINE_FLOOR, is not written (unless --allow-lossy). Far beyond what INT8 costs a model
# that quantizes well (SmolLM2: 1.03x, MiniLM: cosine 0.996), far below a wrecked one (29x).
PERPLEXITY_FLOOR = 1.5
COSINE_FLOOR = 0.9
# A language model is also out of line when its next-token distributions are this far (mean KL, nats) from the FP
# model's: on data the FP model does not predict (random tokens) the perplexity ratio says nothing, and a
# real-shape Gemma 3 wrecked by --static --rotate (logits error 0.54, top token kept at 65 % of positions) scored
# "perplexity 0.001x FP32" there, with KL 7.6. Lossy but working models stay under it: the same Gemma unrotated
# 0.79 (logits error 0.18), random zoo models without smoothing up to 1.0, SmolLM2's defaults far below.
KL_FLOOR = 2.0
CULPRITS = 3  # layers the floor's message names
# The check's noise (`loss_noise`): the half-width of the 95 % confidence interval of the difference between the
# written model's loss and the baseline's, Student's t quantile (0.975, n - 1 degrees of freedom) times its
# standard error. A model as good as the baseline then passes it by chance about 2.5 % of the time (per-sample
# differences about normal), however few the samples (4 by default: 3.182 standard errors; a flat 2 would be 7 %).
# Beyond 10 degrees of freedom the last is kept (2.228 against 2.042 at 30 and 1.960 at infinity: more cautious).
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


@dataclass(frozen=True)
class QualityCheck:
    """What the check measured on `samples` samples (`held_out`: kept back from the statistics; else in-sample,
    when there were too few to keep any back); `other`: the same on the second set, text unlike the calibration
    data (`name` says what it is: --eval-data, or the model's own text from other seed words). A model's numbers on
    calibration-like text flatter it (SmolLM2's W4A8: +7.3 % there, +25.8 % on English prose), so the floor and the
    warnings go by the worse of the two."""

    samples: int
    held_out: bool
    language_model: bool
    loss: float  # perplexity ratio - 1, or 1 - cosine
    output_error: float  # relative L2 error of the first output
    baseline_loss: float | None = None  # plain W8A8 (no smoothing) on the same samples; None: not measured
    baseline_error: float | None = None
    baseline_name: str = "unsmoothed W8A8"
    kl: float = 0.0  # mean KL divergence of the next-token distributions from the FP model's (language models)
    noise: float | None = None  # what loss - baseline_loss can be by chance (loss_noise); None: not measured
    other: QualityCheck | None = None  # the second set's check (None: no second set)
    name: str = ""  # what a second set is

    def describe(self, loss: float) -> str:
        if self.language_model:
            return f"perplexity {1 + loss:.3f}x FP32 ({loss:+.1%})"
        return f"cosine to FP32 {1 - loss:.4f}"

    def difference(self, value: float) -> str:
        """A difference of two losses: perplexity ratio points, or of 1 - cosine."""
        return f"{value:+.2%}" if self.language_model else f"{value:+.4f}"

    def summary(self) -> str:
        text = self._summary()
        if self.other is not None:
            text += f"; on {self.other._summary()}"
        return text

    def _summary(self) -> str:
        where = self.name or ("held-back" if self.held_out else "calibration (in-sample)")
        text = f"{self.samples} samples of {where}: {self.describe(self.loss)}" if self.name else \
            f"quality check on {self.samples} {where} samples: {self.describe(self.loss)}"
        if self.language_model:
            text += f", KL {self.kl:.3g}"
        if self.baseline_loss is not None:
            text += f"; {self.baseline_name} {self.describe(self.baseline_loss)}"
            noise = "not measured" if self.noise is None else self.difference(self.noise).lstrip("+")
            text += f" (difference {self.difference(self.loss - self.baseline_loss)}, noise {noise})"
        return text

    @property
    def worst(self) -> QualityCheck:
        """The set on which the model loses more."""
        return self.other if self.other is not None and self.other.loss > self.loss else self

    @property
    def below_floor(self) -> bool:
        if self.other is not None and self.other.below_floor:
            return True
        if self.language_model:
            return 1 + self.loss > PERPLEXITY_FLOOR or self.kl > KL_FLOOR
        return 1 - self.loss < COSINE_FLOOR

    @property
    def worse_than_baseline(self) -> bool:
        """Losing more than plain W8A8 by more than the check's noise (a few samples: two close losses differ by
        chance, and a warning that fires on a model that lost nothing teaches users to ignore the one that
        matters), and further from the FP model's output by more than a tenth (a perplexity ratio alone can fall
        below 1 by chance: the output error cannot). No measured noise (one sample), no warning. Either set."""
        if self.other is not None and self.other.worse_than_baseline:
            return True
        return (self.baseline_loss is not None and self.baseline_error is not None and self.noise is not None
                and self.loss - self.baseline_loss > self.noise and self.output_error > 1.1 * self.baseline_error)

    def metadata(self) -> str:
        """All but `noise` (the summary has it): the keys it had, so a model's bytes stay those tests/digests.json
        recorded (a new key would change every model written)."""
        return json.dumps(self._fields(), separators=(",", ":"))

    def _fields(self) -> dict[str, object]:
        fields = {k: v for k, v in asdict(self).items() if k not in ("noise", "other", "name")}
        if self.other is not None:
            fields["other"] = {"name": self.other.name, **self.other._fields()}
        return fields


def loss_noise(written: list[float], baseline: list[float], paired: bool) -> float | None:
    """The check's noise: the 95 % confidence half-width (T_975) of mean(written) - mean(baseline), the per-sample
    losses of the two models (Comparison.sample_losses). Its standard error: `paired` (the same samples in the same
    order, so what a hard sample costs both cancels), s(w_i - b_i) / sqrt(n); else sqrt(s(w)^2 / n_w + s(b)^2 / n_b),
    with n - 1 degrees of freedom for the smaller side. s: the sample standard deviation (n - 1). None below two
    samples a side: one sample has no spread to measure."""
    count = min(len(written), len(baseline))
    if count < 2:
        return None
    if paired and len(written) == len(baseline):
        error = np.std(np.subtract(written, baseline), ddof=1) / np.sqrt(count)
    else:
        error = np.sqrt(sum(np.var(side, ddof=1) / len(side) for side in (written, baseline)))
    return float(T_975[min(count - 1, len(T_975)) - 1] * error)


def floor(check: QualityCheck, layers: list[LayerReport], flags: str) -> None:
    """Refuse a model far out of line, naming the numbers and the layers most likely at fault."""
    if not check.below_floor:
        return
    bound = (f"the floor is {PERPLEXITY_FLOOR}x FP32 perplexity and KL {KL_FLOOR}" if check.language_model
             else f"the floor is cosine {COSINE_FLOOR}")
    raise SqonnxError(f"the quantized model is far worse than FP32: {check.summary()} ({bound}); "
                      f"{culprits(layers)}; {_advice(check, flags)}, or pass --allow-lossy to write it anyway")


def culprits(layers: list[LayerReport]) -> str:
    """The layers with the largest INT8 error on calibration rows (--level auto measures it), else the largest
    activation outlier ratio left after smoothing."""
    quantized = [layer for layer in layers if layer.quantized]
    measured = [layer for layer in quantized if layer.row_error is not None]
    if measured:
        worst = sorted(measured, key=lambda layer: -(layer.row_error or 0.0))[:CULPRITS]
        return "largest quantization error on calibration rows: " + ", ".join(
            f"{layer.name} {layer.row_error:.2g}" for layer in worst)
    worst = sorted(quantized, key=lambda layer: -layer.outlier_ratio_after)[:CULPRITS]
    return "largest outlier ratio after smoothing: " + ", ".join(
        f"{layer.name} {layer.outlier_ratio_after:.0f}" for layer in worst)


def _advice(check: QualityCheck, flags: str) -> str:
    if check.worse_than_baseline:
        return f"plain W8A8 does better here: drop {flags or 'the transforms asked for'}"
    return (f"try without {flags}, " if flags else "") + "exclude those layers (--exclude) or try --level O1"


# The LM head (the layer computing the first output) is INT8 by default: half the bytes a decode step reads while
# float (sqonnx.config.DEFAULT_EXCLUDE). Every checked run also measures the model with it float on the same
# samples, and keeps it INT8 unless it adds more than HEAD_SHARE of what the rest of the model loses, and more than
# HEAD_NOISE (what a few samples cannot tell apart): SmolLM2 pays 12.27 -> 12.31 perplexity for it, kept; a head
# whose static range cannot hold its input (a wrecked model's) goes float.
HEAD_SHARE = 0.5
HEAD_NOISE = 0.002


@dataclass(frozen=True)
class HeadVerdict:
    layers: frozenset[str]
    int8: float  # the check's loss with the head quantized
    float: float  # and with it float
    language_model: bool
    kind: str  # how the head was quantized: INT8, or W4A8 (--weights int4)

    @property
    def loses(self) -> bool:
        return self.int8 - self.float > max(HEAD_NOISE, HEAD_SHARE * max(self.float, 0.0))

    def summary(self) -> str:
        def describe(loss: float) -> str:
            return f"perplexity {loss:+.2%}" if self.language_model else f"cosine {1 - loss:.4f}"

        kept = f"float: {self.kind} does not pay" if self.loses else self.kind
        return (f"{kept} ({', '.join(sorted(self.layers))}; {describe(self.int8)} with it {self.kind}, "
                f"{describe(self.float)} float, on the check's samples)")


# The residual-stream rotation is kept only where it pays: when the groups that read the rotated stream have this
# many times the INT8 error on calibration rows they would have without it, it is declined (or, asked for with
# --rotate, a warning). Only a clear loss: the judgement sees the readers, not what the rotation does for the
# writers' weight columns and R2's value heads (SmolLM2: readers 0.000437 rotated, 0.000433 without, and rotation
# takes its perplexity from +7.0 % to +3.3 %), while norm gains folded into the readers cost 100x and more
# (tests/test_quality.py: 0.09 against 0.0003).
ROTATION_LOSS = 4.0


@dataclass(frozen=True)
class RotationVerdict:
    rotated: float  # mean relative INT8 error, on calibration rows, of the groups reading the rotated stream
    plain: float  # the same groups as they would be without the rotation
    groups: int

    @property
    def loses(self) -> bool:
        return self.rotated > ROTATION_LOSS * self.plain

    def summary(self) -> str:
        return (f"INT8 error on calibration rows of the {self.groups} groups reading the stream {self.rotated:.3g} "
                f"rotated, {self.plain:.3g} without")


def rotation_verdict(errors: dict[str, tuple[float, float]]) -> RotationVerdict | None:
    if not errors:
        return None
    return RotationVerdict(float(np.mean([r for r, _ in errors.values()])),
                           float(np.mean([p for _, p in errors.values()])), len(errors))


@dataclass(frozen=True)
class RotationJudge:
    """What judging the rotation needs: Q, and the values the folded norms hand to their readers."""

    q: Orthogonal
    readers: frozenset[str]


def rotation_judge(rotation: RotationResult) -> RotationJudge | None:
    """Q and the rotated norms' outputs, for judging the rotation while each block is built (build.RotationJudge)."""
    if not rotation.rotated or not rotation.norms:
        return None
    return RotationJudge(orthogonal(rotation.hidden, rotation.seed), frozenset(rotation.norms))
