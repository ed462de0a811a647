"""A run is prepare -> plan -> write. This module makes the plan: it prepares the model, runs the passes over its
blocks (each choice that needs the whole model's evidence staged as a candidate and decided in
`judgements.decisions`), declines the rotation where it loses, and holds every decision with the measurement
behind it. The plan is recorded in the report (`settings`) and the output's metadata (`metadata`), and names the
stage to move into place: each stage gets each block once, and the output is never rewritten.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import onnx_ir as ir

from sqonnx.config import Level, QuantizeConfig, Rounding, tool_version
from sqonnx.formats import NBITS_LEVELS, NBits, primary
from sqonnx.io.load import load_model
from sqonnx.io.writer import Stage, StreamingWriter
from sqonnx.judgements.decisions import RotationDecision, decide_rotation
from sqonnx.judgements.quality import RotationVerdict, floor, rotation_judge
from sqonnx.passes.smooth import SMOOTHED_KEY
from sqonnx.run.front import Loaded, Prepared, prepare_model
from sqonnx.run.pipeline import Outcome, Pipeline
from sqonnx.run.progress import Progress
from sqonnx.runtime.session import calibration_providers
from sqonnx.targets import INT16_MAX, Target, full_range_is_safe, resolve, rules_of, static_only

logger = logging.getLogger(__name__)


@dataclass
class Plan:
    """Every decision of one run: the rotation (kept or declined, with the errors behind it), α (asked, or chosen
    per group or as a single value with each candidate's error), each layer's smoothing, level and weight format
    with its reason and error (`outcome.result.layer_reports`), the LM head's format, the layers kept float, the
    target's rules; the quality check of what was built; and the stage that holds it."""

    requested: QuantizeConfig
    front: Prepared
    outcome: Outcome
    rotation: RotationDecision

    @property
    def stage(self) -> Stage:
        return self.outcome.stage

    def settings(self) -> dict[str, object]:
        settings = _settings(self.requested, self.outcome, self.front)
        verdict = self.rotation.verdict
        if verdict is not None:
            settings["rotation"] = (f"not rotated: the rotation loses ({verdict.summary()})" if self.rotation.declined
                                    else f"{settings['rotation']}; {verdict.summary()}")
        return settings

    def metadata(self, settings: dict[str, object]) -> dict[str, str]:
        """The output's metadata, from the report's `settings`."""
        return _metadata(settings, self.outcome, self.front.feeds.count - self.front.feeds.other)


def plan_run(loaded: Loaded, model_path: Path, config: QuantizeConfig, writer: StreamingWriter,
             progress: Progress) -> Plan:
    """Prepare the loaded model (taken out of `loaded`), build every block (staging the candidates), decide. Where
    the rotation loses (the default), the same run again unrotated (its calibration statistics differ: no cache),
    its stage replacing the rotated one, the first model freed before the second is read."""
    model, loaded.model = loaded.model, None
    assert model is not None, "a Loaded input is planned once"
    providers, note = calibration_providers(config.calibration_provider.value)
    if note:
        logger.warning(note)
    front, outcome = _passes(model, model_path, config, writer, progress, providers)
    del model
    rotation = decide_rotation(config, outcome.result.rotation_errors)
    if rotation.declined:
        assert rotation.verdict is not None
        progress.note(f"the rotation loses ({rotation.verdict.summary()}): quantizing again without it")
        outcome.stage.drop()
        del front, outcome
        front, outcome = _passes(load_model(model_path), model_path, replace(config, rotate=False, cache_dir=None),
                                 writer, progress, providers)
    return Plan(config, front, outcome, rotation)


def _passes(model: ir.Model, model_path: Path, config: QuantizeConfig, writer: StreamingWriter, progress: Progress,
            providers: list[str | tuple[str, dict[str, str]]]) -> tuple[Prepared, Outcome]:
    front = prepare_model(model, model_path, config, writer.scratch, progress)
    pipeline = Pipeline(front, writer.scratch, progress, verify=config.verify_fusion and not config.smooth_only,
                        rotation=rotation_judge(front.rotation) if not config.smooth_only else None,
                        providers=providers)
    return front, pipeline.quantize(config, writer)


def enforce(plan: Plan) -> None:
    """The quality check's verdict, before anything is moved into place: a model far out of line is an error
    (unless --allow-lossy), one that loses more than plain W8A8 a warning; so is an explicit --rotate that loses."""
    _judge(plan.outcome, plan.requested, plan.rotation.verdict)


def _judge(outcome: Outcome, config: QuantizeConfig, rotation: RotationVerdict | None) -> None:
    if rotation is not None and rotation.loses and config.rotate is True:
        logger.warning("--rotate loses (%s); pass --no-rotate, or leave the default, which then declines it",
                       rotation.summary())
    check = outcome.check
    if check is None or config.smooth_only:
        return
    asked = " ".join(flag for flag, given in (
        ("--no-smooth", not config.smooth), ("--rotate", config.rotate is True),
        ("--static", not config.level_auto and config.level is Level.O3),
        (f"--alpha {config.alpha}", config.smooth and config.alpha != QuantizeConfig.alpha)) if given)
    if not config.allow_lossy:
        floor(check, outcome.result.layer_reports, asked)
        if outcome.decode_check is not None and outcome.decode is not None:
            floor(outcome.decode_check, outcome.decode.layer_reports, f"{asked} --decode-weights".strip())
    else:
        for stage, measured in (("", check), (" (its decode stage)", outcome.decode_check)):
            if measured is not None and measured.below_floor:
                logger.warning("writing a model far worse than FP32%s (--allow-lossy): %s", stage, measured.summary())
    if check.worse_than_baseline and not check.below_floor:
        logger.warning("the written model loses more than %s on the same samples (%s)%s", check.baseline_name,
                       check.summary(),
                       f": try without {asked}" if asked else "")


def _settings(requested: QuantizeConfig, outcome: Outcome, front: Prepared) -> dict[str, object]:
    config, result = outcome.config, outcome.result
    worst_pair = result.worst_pair
    if worst_pair > INT16_MAX and not full_range_is_safe(config.target):
        raise AssertionError(f"internal error: weights of a {config.target.value} model can overflow int16")
    settings = _base_settings(requested, worst_pair)
    settings["rotation"] = front.rotation.summary()
    blocks = front.partition
    settings["blocks"] = (f"one block: {blocks.reason}" if blocks.reason else
                          f"{len(blocks.blocks)} blocks of at most {requested.block_bytes >> 20} MB of weights "
                          f"(largest {max(b.weight_bytes for b in blocks.blocks) / 1e6:.0f} MB)")
    if outcome.alpha_trials:
        kept = "per group" if config.alpha_auto else config.alpha
        settings["alpha"] = f"{settings['alpha']}: chose {kept} (output error on calibration samples: " + \
            ", ".join(f"{key} {loss:.4f}" for key, loss in outcome.alpha_trials.items()) + ")"
    if static_only(config.target) and not config.smooth_only:
        floated = outcome.kept_float
        budget = config.float_budget
        kept = (f"{len(floated)} layers kept float (INT8 there costs more than the budget, quality loss "
                f"{budget:g}): {', '.join(floated)}" if floated and budget is not None
                else "no layer kept float" + (f" (every layer INT8 fits the budget, quality loss {budget:g})"
                                              if budget is not None else ""))
        rules = rules_of(config.target)
        if rules.describe is not None:
            settings[rules.target.value] = rules.describe(result.checked_nodes, result.quantized_layers, kept)
    if requested.cache_dir is not None:
        settings["cache"] = (f"{requested.cache_dir}: calibration of blocks 1-{outcome.resumed} reused"
                             if outcome.resumed else f"{requested.cache_dir}: calibration kept for later runs")
    if requested.sequential:
        settings["sequential"] = "each block calibrated on the INT8 output of the blocks before it"
    if requested.optimize:
        settings["optimize"] = ", ".join(f"{n} {op}" for op, n in front.fused.items()) or "nothing fused"
    if outcome.keep_float:
        settings["keep_float"] = [asdict(t) for t in outcome.keep_float]
    if outcome.head is not None:
        settings["lm_head"] = outcome.head.summary()
    if not config.smooth_only:
        settings["quality_check"] = outcome.check.summary() if outcome.check is not None else \
            "quality check: off (--check-samples 0)"
    if outcome.decode is not None:
        settings["decode"] = _decode_summary(config, outcome)
    return settings


def _decode_summary(config: QuantizeConfig, outcome: Outcome) -> str:
    """--decode-weights: what the decode stage holds, its LM head's verdict, its layers on the check's samples."""
    assert outcome.decode is not None
    decode = config.decode_config
    assert decode is not None
    fmt = primary(decode)
    assert isinstance(fmt, NBits)
    layers = [r for r in outcome.decode.layer_reports if r.quantized]
    blocks = sum(r.level in NBITS_LEVELS for r in layers)
    text = (f"decode stage (one token with the key/value cache; the graph branches on the token count): {blocks} of "
            f"{len(layers)} layers {fmt.level} ({fmt.name}, blocks of {config.int4_block}, rounded "
            f"{decode.rounding.value})"
            + (f", {len(layers) - blocks} kept W8A8 where {fmt.breaks} break" if len(layers) > blocks else ""))
    if outcome.decode_head is not None:
        text += f"; LM head {outcome.decode_head.summary()}"
    if outcome.decode.kernels is not None:
        text += f"; onnxruntime CPU: {outcome.decode.kernels.summary()}"
    if outcome.decode_check is not None:
        text += f"; its layers alone, every token at once: {outcome.decode_check.summary()}"
    return text


def _metadata(settings: dict[str, object], outcome: Outcome, samples: int) -> dict[str, str]:
    config, reports = outcome.config, outcome.result.layer_reports
    metadata = _base_metadata(settings, samples, outcome.result.quantized_layers,
                              sum(r.scale_min is not None for r in reports), config.smooth_only)
    if outcome.check is not None and not config.smooth_only:
        metadata["sqonnx.quality_check"] = outcome.check.metadata()
    if outcome.head is not None:
        metadata["sqonnx.lm_head"] = str(settings["lm_head"])
    if outcome.keep_float:
        metadata["sqonnx.float_layers"] = json.dumps(outcome.kept_float)
    if config.level_auto:
        metadata["sqonnx.level_per_layer"] = json.dumps(
            {r.name: r.level for r in reports if r.quantized and r.level != Level.O3.value}, separators=(",", ":"))
    if config.alpha_auto and config.smooth:
        metadata["sqonnx.alpha_per_layer"] = json.dumps(
            {r.name: r.alpha for r in reports if r.quantized and r.alpha is not None}, separators=(",", ":"))
    if "decode" in settings:
        metadata["sqonnx.decode"] = str(settings["decode"])
    if any(r.scale_min is not None for r in reports):
        metadata[SMOOTHED_KEY] = "alpha=auto" if config.alpha_auto else f"alpha={config.alpha}"
    return metadata


def _base_settings(config: QuantizeConfig, worst_pair: int) -> dict[str, object]:
    target = resolve(config.target)
    target_text = target.value if config.target is not Target.NATIVE else f"native ({target.value}, detected)"
    return {
        "alpha": (f"auto ({config.alpha_range[0]}-{config.alpha_range[1]}, per group)" if config.alpha_auto
                  else config.alpha) if config.smooth else None,
        "calib_method": config.calib_method.value if config.level is Level.O3 else "none (dynamic activations)",
        "level": "auto (O3; O1 per token where one static range cannot hold a group)"
        if config.level_auto else config.level.value,
        "format": config.format_used.value,
        "target": target_text,
        "weights": _nbits_weights(config)
        + f"int8 symmetric {'per-channel' if config.per_channel else 'per-tensor'} "
          f"[-{config.weight_qmax}, {config.weight_qmax}]",
        "weight_rounding": config.rounding.value + (
            f" (act-order{'' if config.act_order else ' off'}; X^T X per layer group from calibration)"
            if config.rounding is Rounding.GPTQ else ""),
        "weight_range": "reduced (7-bit): no int16 saturation on x86 without VNNI" if config.reduced_range
        else "full (8-bit): only for VNNI, ARM or GPU targets",
        # u8 activation 255 times the worst adjacent weight pair: what vpmaddubsw adds into int16.
        "int16_worst_case": f"{worst_pair} ({'fits' if worst_pair <= INT16_MAX else 'exceeds'} int16 max {INT16_MAX})",
        "activations": config.level.activations + (
            "; int8 dynamic per-token where needed" if config.level_auto else ""),
        "exclude": list(config.exclude),
        "unabsorbed": config.unabsorbed.value,
    } | ({key: "float (--smooth-only)" for key in FLOAT_SETTINGS} if config.smooth_only else {})


def _nbits_weights(config: QuantizeConfig) -> str:
    """The MatMulNBits part of the weights' description (empty for W8A8)."""
    if not config.weights.matmul_nbits:
        return ""
    fmt = primary(config)
    assert isinstance(fmt, NBits)
    return (f"int{fmt.bits} symmetric blocks of {config.int4_block} (MatMulNBits, accuracy_level 4: int8 "
            f"activations per block in the kernel); where {fmt.breaks} break, ")


# What --smooth-only leaves in float: the metadata says so instead of describing a quantization.
FLOAT_SETTINGS = ("calib_method", "level", "format", "weights", "weight_rounding", "weight_range", "activations")


def _base_metadata(settings: dict[str, object], samples: int, quantized: int, smoothed: int,
                   smooth_only: bool) -> dict[str, str]:
    keys = ("level", "format", "target", "weights", "weight_rounding", "weight_range", "int16_worst_case",
            "activations", "calib_method")
    return {
        "sqonnx.version": tool_version(),
        "sqonnx.alpha": "none (not smoothed)" if settings["alpha"] is None else str(settings["alpha"]),
        **{f"sqonnx.{key}": str(settings[key]) for key in keys},
        "sqonnx.calibration_samples": str(samples),
        "sqonnx.quantized_layers": str(quantized),
        "sqonnx.smoothed_layers": str(smoothed),
        "sqonnx.rotation": str(settings.get("rotation", "")),
        **({"sqonnx.smooth_only": "true"} if smooth_only else {}),
    }


