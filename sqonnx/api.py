"""`sqonnx.quantize`: the whole pipeline, load -> calibrate -> smooth -> quantize -> save -> report, block by block.

Each step is a pass or a pure function; this module only wires them and builds the report.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, replace
from pathlib import Path

import onnx_ir as ir

from sqonnx.config import Level, QuantizeConfig, Rounding, Weights, tool_version
from sqonnx.errors import SqonnxError
from sqonnx.graph.tensorrt import MAX_OPSET
from sqonnx.graph.tensors import opset_version
from sqonnx.io.genai import companion_files
from sqonnx.io.load import load_model
from sqonnx.io.writer import StreamingWriter, check_output_path
from sqonnx.judgements.quality import RotationVerdict, floor, rotation_judge, rotation_verdict
from sqonnx.passes.smooth import SMOOTHED_KEY
from sqonnx.report import QuantizeReport
from sqonnx.run.front import Prepared, prepare_model
from sqonnx.run.pipeline import Outcome, Pipeline
from sqonnx.run.progress import Progress, peak_rss_bytes
from sqonnx.runtime.session import calibration_providers
from sqonnx.targets import CUDA_QDQ_OPSET, INT16_MAX, Target, full_range_is_safe, resolve, static_only

logger = logging.getLogger(__name__)

QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "QLinearMatMul", "MatMulInteger",
                 "DynamicQuantizeLinear", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QGemm", "MatMulNBits"}


def quantize(model_path: str | Path, output_path: str | Path | None = None,
             config: QuantizeConfig | None = None, *, progress: bool = False) -> QuantizeReport:
    """Quantize `model_path` to W8A8 SmoothQuant and save it at `output_path` (default `<stem>.int8.onnx`).
    `progress`: a line per block (and a bar on a terminal) on stderr."""
    return _quantize(Path(model_path), output_path, config or QuantizeConfig(), Progress(progress))


def _quantize(model_path: Path, output_path: str | Path | None, config: QuantizeConfig,
              progress: Progress) -> QuantizeReport:
    started = time.perf_counter()
    output_path = Path(output_path) if output_path is not None else model_path.with_suffix(".int8.onnx")
    check_output_path(model_path, output_path)
    with progress.phase("load"):
        model = load_model(model_path)
        companions = companion_files(model_path, output_path)  # an onnxruntime-genai folder's config and tokenizer
        _check_quantizable(model, config)
        input_bytes = _model_bytes(model_path, model)
        external = any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values())
    providers, note = calibration_providers(config.calibration_provider.value)
    if note:
        logger.warning(note)
    with StreamingWriter(output_path, external, companions) as writer:
        front, outcome = _run(model, model_path, config, writer, progress, providers)
        del model
        verdict = rotation_verdict(outcome.result.rotation_errors)
        declined = config.rotate is None and verdict is not None and verdict.loses
        if declined:
            # kept only where it pays: the same run again, unrotated (calibration statistics differ: no cache)
            assert verdict is not None
            progress.note(f"the rotation loses ({verdict.summary()}): quantizing again without it")
            del front, outcome
            writer.restart()
            front, outcome = _run(load_model(model_path), model_path, replace(config, rotate=False, cache_dir=None),
                                  writer, progress, providers)
        _judge(outcome, config, verdict)
        settings = _settings(config, outcome, front)
        if verdict is not None:
            settings["rotation"] = (f"not rotated: the rotation loses ({verdict.summary()})" if declined
                                    else f"{settings['rotation']}; {verdict.summary()}")
        with progress.phase("save"):
            written = writer.finish(front.model, _metadata(settings, outcome, front.feeds.count))
    report = QuantizeReport(
        input_path=str(model_path), output_path=str(output_path), settings=settings,
        calibration=front.feeds.description, layers=outcome.result.layer_reports, kernels=outcome.result.kernels,
        input_bytes=input_bytes, output_bytes=written, seconds=time.perf_counter() - started,
        phases=dict(progress.phases), peak_rss_bytes=peak_rss_bytes(), check=outcome.check)
    if report.kernels is not None and report.kernels.unfused:
        logger.warning("onnxruntime left %d quantized layers unfused (float MatMul after DequantizeLinear): %s",
                       len(report.kernels.unfused), ", ".join(report.kernels.unfused[:5]))
    return report


def _run(model: ir.Model, model_path: Path, config: QuantizeConfig, writer: StreamingWriter, progress: Progress,
         providers: list[str | tuple[str, dict[str, str]]]) -> tuple[Prepared, Outcome]:
    front = prepare_model(model, model_path, config, writer.scratch, progress)
    pipeline = Pipeline(front.model, front.partition, front.samples, front.quantized, writer.scratch, progress,
                        config.verify_fusion and not config.smooth_only, front.cache,
                        rotation_judge(front.rotation) if not config.smooth_only else None)
    pipeline.providers = providers
    return front, pipeline.quantize(config, writer)


def _judge(outcome: Outcome, config: QuantizeConfig, rotation: RotationVerdict | None) -> None:
    """The quality check's verdict, before anything is moved into place: a model far out of line is an error
    (unless --allow-lossy), one that loses more than plain W8A8 a warning; so is an explicit --rotate that loses."""
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
    elif check.below_floor:
        logger.warning("writing a model far worse than FP32 (--allow-lossy): %s", check.summary())
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
        floated = [r.name for r in result.layer_reports if r.level_reason.startswith("float: needs per-token")]
        kept = (f"{len(floated)} layers kept float (per-token groups): {', '.join(floated)}" if floated
                else "no layer kept float")
        if config.target is Target.TENSORRT:
            settings["tensorrt"] = (f"{result.tensorrt_qdq} Q/DQ nodes checked against TensorRT's INT8 rules (int8, "
                                    "zero points 0, positive constant scales, per-tensor activations, per-channel "
                                    f"weights, opset <= {MAX_OPSET}): all pass; {kept}")
        else:
            settings["cuda"] = (f"{result.quantized_layers} layers as int8 QuantizeLinear -> MatMulInteger (int8 x "
                                "int8) -> Cast -> Mul, every node with a kernel of onnxruntime's CUDA provider (by its "
                                f"registrations; not run on a GPU here); {kept}")
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
    return settings


def _metadata(settings: dict[str, object], outcome: Outcome, samples: int) -> dict[str, str]:
    config, reports = outcome.config, outcome.result.layer_reports
    metadata = _base_metadata(settings, samples, outcome.result.quantized_layers,
                              sum(r.scale_min is not None for r in reports), config.smooth_only)
    if outcome.check is not None and not config.smooth_only:
        metadata["sqonnx.quality_check"] = outcome.check.metadata()
    if outcome.head is not None:
        metadata["sqonnx.lm_head"] = str(settings["lm_head"])
    if outcome.keep_float:
        metadata["sqonnx.float_layers"] = json.dumps(outcome.keep_float[-1].float_layers)
    if config.level_auto:
        metadata["sqonnx.level_per_layer"] = json.dumps(
            {r.name: r.level for r in reports if r.quantized and r.level != Level.O3.value}, separators=(",", ":"))
    if config.alpha_auto and config.smooth:
        metadata["sqonnx.alpha_per_layer"] = json.dumps(
            {r.name: r.alpha for r in reports if r.quantized and r.alpha is not None}, separators=(",", ":"))
    if any(r.scale_min is not None for r in reports):
        metadata[SMOOTHED_KEY] = "alpha=auto" if config.alpha_auto else f"alpha={config.alpha}"
    return metadata


def _check_quantizable(model: ir.Model, config: QuantizeConfig) -> None:
    opset = opset_version(model.graph)
    # Per-axis DequantizeLinear came in opset 13; DynamicQuantizeLinear and Round in 11.
    per_axis_dq = config.per_channel and not config.integer_form
    needed = max(13 if per_axis_dq else 10, 10 if config.level is Level.O3 else 11)
    if opset < needed and not config.smooth_only:
        hint = " (or --per-tensor, which needs 10)" if per_axis_dq and opset >= 10 and config.level is Level.O3 else ""
        raise SqonnxError(f"the model uses opset {opset}; {config.level.value} {config.format_used.value} "
                          f"quantization needs opset {needed} or newer: convert it with "
                          f"onnx.version_converter.convert_version(model, 17){hint}")
    if config.target is Target.CUDA and opset > CUDA_QDQ_OPSET and not config.smooth_only:
        raise SqonnxError(f"the model uses opset {opset}; onnxruntime's CUDA QuantizeLinear is registered up to "
                          f"{CUDA_QDQ_OPSET} (later ones run on the CPU): convert it with "
                          f"onnx.version_converter.convert_version(model, {CUDA_QDQ_OPSET}) first")
    if config.target is Target.TENSORRT and opset > MAX_OPSET and not config.smooth_only:
        raise SqonnxError(f"the model uses opset {opset}; TensorRT 10's parser reads up to {MAX_OPSET}: convert it "
                          f"with onnx.version_converter.convert_version(model, {MAX_OPSET}) first")
    already = sorted({node.op_type for node in model.graph if node.op_type in QUANTIZED_OPS})
    if already:
        raise SqonnxError(f"the model is already quantized (it has {', '.join(already)}); "
                          "pass the original float model")


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
        "weights": (f"int4 symmetric blocks of {config.int4_block} (MatMulNBits, accuracy_level 4: int8 activations "
                    "per block in the kernel); where 4 bits break, " if config.weights is Weights.INT4 else "")
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


def _model_bytes(path: Path, model: ir.Model) -> int:
    """The .onnx file plus every external data file its initializers point to."""
    data_files = {Path(v.const_value.path) for v in model.graph.initializers.values()
                  if isinstance(v.const_value, ir.ExternalTensor)}
    return path.stat().st_size + sum(f.stat().st_size for f in data_files if f.exists())
