"""The `sqonnx` command. Each command maps onto one library function; user mistakes print one line."""

from __future__ import annotations

import enum
import json
import logging
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from sqonnx.api import compare as compare_models
from sqonnx.api import quantize as quantize_model
from sqonnx.config import (
    AUTO,
    DEFAULT_EXCLUDE,
    MB,
    OWN_TEXT_SHARE,
    CalibMethod,
    CalibrationConfig,
    Format,
    Level,
    Provider,
    QuantizeConfig,
    Rounding,
    Unabsorbed,
    Weights,
    block_bytes,
)
from sqonnx.errors import SqonnxError
from sqonnx.targets import Target


class DecodeChoice(str, enum.Enum):
    """--decode-weights: the MatMulNBits forms of the decode stage."""

    INT4 = Weights.INT4.value
    INT8_BLOCKS = Weights.INT8_BLOCKS.value


class LevelChoice(str, enum.Enum):
    """--level: a Level, or auto (O3 with per-token O1 where needed)."""

    O1 = "O1"
    O2 = "O2"
    O3 = "O3"
    AUTO = "auto"


app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="SmoothQuant W8A8 INT8 quantization for ONNX transformer models.")


@app.callback()
def _root() -> None:
    """SmoothQuant W8A8 INT8 quantization for ONNX transformer models."""


@app.command()
def quantize(
    model: Annotated[Path, typer.Argument(help="FP32 .onnx model (a tokenizer.json beside it for text calibration)")],
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Output .onnx [default: <model>.int8.onnx]")] = None,
    alpha: Annotated[str, typer.Option(
        help="Migration strength a in s = max|X|^a / max|W|^(1-a), or 'auto': searched per layer group")] = "0.5",
    alpha_range: Annotated[str, typer.Option(help="With --alpha auto: LOW,HIGH bounds of the search")] = "0.05,0.95",
    calib_method: Annotated[CalibMethod, typer.Option(
        help="O3 static activation range: minmax, percentile (99.99%), mse (least squared error)")
    ] = CalibMethod.MINMAX,
    static: Annotated[bool, typer.Option(
        "--static", help="Static per-tensor activations everywhere (= --level O3)")] = False,
    dynamic: Annotated[bool, typer.Option(
        "--dynamic", help="Dynamic activations: per-tensor (= --level O2); per-token with --per-token (O1)")
    ] = False,
    per_token: Annotated[bool, typer.Option("--per-token", help="With --dynamic: one scale per token (O1)")] = False,
    level: Annotated[LevelChoice | None, typer.Option(
        help="O1 per-token dynamic, O2 per-tensor dynamic, O3 per-tensor static (fastest), auto: O3 and O1 "
             "for the layers one static range cannot hold [default: auto]")] = None,
    format: Annotated[Format, typer.Option(
        "--format", help="qdq: Q/DQ around float ops (portable); qoperator: explicit MatMulInteger")] = Format.QDQ,
    target: Annotated[Target, typer.Option(
        help="Where the model runs; decides the weight range. native: detect this CPU")] = Target.PORTABLE,
    smooth: Annotated[bool, typer.Option("--smooth/--no-smooth", help="Apply SmoothQuant before quantizing")] = True,
    rotate: Annotated[bool | None, typer.Option(
        "--rotate/--no-rotate", show_default=False,
        help="Rotate the residual stream first (exact; spreads outlier channels) [default: where the graph "
             "allows it offline: RMSNorm decoders]")] = None,
    smooth_only: Annotated[bool, typer.Option(
        "--smooth-only", help="Only fold the smoothing factors: a float model for TensorRT or another quantizer")
    ] = False,
    per_channel: Annotated[bool, typer.Option(
        "--per-channel/--per-tensor", help="Weight scale per output channel, or per tensor (paper)")] = True,
    reduce_range: Annotated[bool | None, typer.Option(
        "--reduce-range/--full-range", show_default=False,
        help="7-bit or 8-bit weights [default: what --target needs; full range only for VNNI/ARM/GPU]")] = None,
    exclude: Annotated[list[str] | None, typer.Option(
        help="Node-name glob to keep in float, e.g. '*lm_head*'; repeatable [default: none, every linear layer "
             "is quantized]")] = None,
    unabsorbed: Annotated[Unabsorbed, typer.Option(
        help="Groups whose producer cannot absorb 1/s. auto: an explicit Mul only where calibration shows it cuts "
             "the group's INT8 error by a fifth; skip: never; mul: always")] = Unabsorbed.AUTO,
    calib_data: Annotated[list[Path] | None, typer.Option(
        help="Calibration text file or .npz of input feeds; repeated, or a folder: text files mixed, an equal share "
             "each [default: Python's pydoc topics, and --own-text of the model's own sampled text where it can "
             "write it]")] = None,
    eval_data: Annotated[Path | None, typer.Option(
        help="Text unlike the calibration data (a text file or .npz) the quality check also measures the model on, "
             "--check-samples windows [default: the model's own text from other seed words, where it can write "
             "it]")] = None,
    own_text: Annotated[float | None, typer.Option(
        help="Share of the calibration windows a decoder with a key/value cache writes itself, sampled at temperature "
             f"1 from seed words, beside the pydoc text; 0: pydoc alone; not with --calib-data [default: "
             f"{OWN_TEXT_SHARE:g} with int4 weights (--weights or --decode-weights), else 0]")] = None,
    num_samples: Annotated[int, typer.Option(help="Calibration samples")] = 128,
    seq_len: Annotated[int, typer.Option(help="Tokens per calibration sample (text data)")] = 512,
    decode_steps: Annotated[int, typer.Option(
        help="Single-token decode steps calibrated through the key/value cache after the prefill samples (a "
             "with-past decoder and text data): the model's own greedy tokens after a prompt; 0: prefill only")
    ] = 64,
    report_json: Annotated[Path | None, typer.Option(help="Also write the per-layer report as JSON")] = None,
    keep_float_budget: Annotated[float | None, typer.Option(
        help="Leave the fewest most sensitive layers in float until the quality loss on calibration samples "
             "(perplexity ratio - 1, or 1 - cosine) is at most this, e.g. 0.05")] = None,
    optimize: Annotated[bool, typer.Option(
        "--optimize", help="Fuse norms/Gelu with onnxruntime's transformer optimizer first (needs config.json)")
    ] = False,
    verify: Annotated[bool, typer.Option("--verify/--no-verify",
                                         help="Ask onnxruntime which CPU kernels the output runs")] = True,
    cache_dir: Annotated[Path | None, typer.Option(
        help="Keep each finished block's calibration here: a killed run resumes, a rerun with another alpha, "
             "level or target skips calibration")] = None,
    sequential: Annotated[bool, typer.Option(
        "--sequential", help="Calibrate each block on the INT8 output of the blocks before it (GPTQ's sequential "
                             "mode) instead of the FP model's")] = False,
    check_samples: Annotated[int, typer.Option(
        help="Samples kept back from calibration to measure the written model against FP32 (and unsmoothed W8A8) "
             "in every run; 0: no check")] = 4,
    allow_lossy: Annotated[bool, typer.Option(
        "--allow-lossy", help="Write the model even when the quality check finds it far worse than FP32 "
                              "(perplexity over 1.5x, or cosine under 0.9)")] = False,
    block_size: Annotated[float, typer.Option(
        "--block-size", help="MB of weights worked on at once: the model is calibrated, quantized and written "
                             "block by block along its residual stream; less memory, more sessions")] = 256,
    weights: Annotated[Weights, typer.Option(
        help="int8: W8A8; int4: W4A8, 4-bit block weights as onnxruntime's MatMulNBits (int8 activations per "
             "block inside the kernel), layers 4 bits would break stay W8A8; int8-blocks: 8-bit MatMulNBits "
             "blocks (faster decode, slower prefill than int8)")] = Weights.INT8,
    decode_weights: Annotated[DecodeChoice | None, typer.Option(
        help="int4 or int8-blocks: a decode stage beside the W8A8 prompt stage, one graph branching on the token "
             "count: single-token runs (with the key/value cache) take MatMulNBits layers, the fastest decode, "
             "prompts the INT8 GEMM, the fastest prefill [default: one graph for both]")] = None,
    weight_rounding: Annotated[Rounding | None, typer.Option(
        help="nearest, or gptq: error feedback through the calibration inputs (X^T X per layer group) "
             "[default: gptq for int4 weights (--weights or --decode-weights), nearest for 8 bits]")] = None,
    int4_block: Annotated[int, typer.Option(
        help="MatMulNBits (--weights or --decode-weights int4, int8-blocks): input channels per block (a scale "
             "each): 32, 64 or 128")] = 32,
    calibration_provider: Annotated[Provider, typer.Option(
        help="Where calibration runs: cuda (onnxruntime-gpu on an NVIDIA GPU, TF32 off), cpu, or auto: cuda when "
             "this onnxruntime has it")] = Provider.AUTO,
    act_order: Annotated[bool, typer.Option(
        "--act-order/--no-act-order", help="GPTQ: round channels in order of decreasing X^T X diagonal (block "
                                           "scales fixed beforehand, no g_idx)")] = True,
) -> None:
    """Quantize MODEL to INT8 with SmoothQuant."""
    with _user_errors("interrupted: no output written"):
        config = QuantizeConfig(
            alpha=_alpha(alpha), alpha_range=_alpha_range(alpha_range), calib_method=calib_method, smooth=smooth,
            smooth_only=smooth_only, rotate=rotate,
            level=_level(None if level in (None, LevelChoice.AUTO) else Level(level.value), static, dynamic,
                         per_token),
            per_token_where_needed=_level_auto(level, static, dynamic, per_token), format=format,
            target=target, per_channel=per_channel, reduce_range=reduce_range,
            exclude=tuple(exclude) if exclude else DEFAULT_EXCLUDE, unabsorbed=unabsorbed,
            calibration=CalibrationConfig(data=tuple(calib_data or ()), eval_data=eval_data, num_samples=num_samples,
                                          seq_len=seq_len, decode_steps=decode_steps, own_text=own_text),
            verify_fusion=verify, optimize=optimize, keep_float_budget=keep_float_budget,
            block_bytes=block_bytes(block_size), cache_dir=cache_dir, sequential=sequential,
            check_samples=check_samples, allow_lossy=allow_lossy, weights=weights,
            decode_weights=Weights(decode_weights.value) if decode_weights else None,
            weight_rounding=weight_rounding, int4_block=int4_block, act_order=act_order,
            calibration_provider=calibration_provider)
        if report_json is not None:
            _check_writable_file(report_json, "--report-json")
        report = quantize_model(model, output, config, progress=True)
        if report_json is not None:
            try:
                report_json.write_text(json.dumps(report.to_dict(), indent=2, default=str))
            except OSError as exc:
                raise SqonnxError(f"the model is written, but not --report-json {report_json}: "
                                  f"{exc.strerror}") from None
    typer.echo(report.summary())


@app.command()
def inspect(
    model: Annotated[Path, typer.Argument(help="FP32 .onnx model")],
    out: Annotated[Path, typer.Option("--out", help="Folder for index.html, report.json and PNG plots")],
    alpha: Annotated[str, typer.Option(help="α to show, or 'auto' (searched per layer group)")] = AUTO,
    level: Annotated[Level, typer.Option(help="Level the sensitivities are measured at")] = Level.O3,
    calib_data: Annotated[list[Path] | None, typer.Option(
        help="Calibration text or .npz; repeated, or a folder: text files mixed [default: pydoc topics]")] = None,
    num_samples: Annotated[int, typer.Option(help="Calibration samples")] = 32,
    seq_len: Annotated[int, typer.Option(help="Tokens per calibration sample (text data)")] = 512,
    top: Annotated[int, typer.Option(help="Plot this many layer groups with the worst outliers")] = 8,
) -> None:
    """Show MODEL's activation outliers per layer, before and after smoothing (HTML + PNG report)."""
    from sqonnx.run.inspection import inspect_model

    with _user_errors("interrupted"):
        config = QuantizeConfig(alpha=_alpha(alpha), level=level, calibration=CalibrationConfig(
            data=tuple(calib_data or ()), num_samples=num_samples, seq_len=seq_len))
        results = inspect_model(model, out, config, top=top, progress=sys.stderr.isatty())
    worst = max(results, key=lambda r: r.activation_ratio_before)
    typer.echo(f"{len(results)} layer groups; worst activation outliers: {', '.join(worst.layers)} (max/median "
               f"{worst.activation_ratio_before:.1f} -> {worst.activation_ratio_after:.1f} after smoothing)")
    typer.echo(f"report: {out / 'index.html'}")


@app.command()
def compare(
    fp: Annotated[Path, typer.Argument(help="The FP .onnx model (its tokenizer.json beside it for text data)")],
    quantized: Annotated[Path, typer.Argument(help="Its quantized .onnx")],
    data: Annotated[Path | None, typer.Option(
        help="Text or .npz of input feeds to measure on [default: held-out pydoc topics]")] = None,
    samples: Annotated[int, typer.Option(help="Samples (windows of text) to measure on")] = 8,
    seq_len: Annotated[int, typer.Option(help="Tokens per sample (text data)")] = 512,
    rounds: Annotated[int, typer.Option(help="Timed prefill runs of each model, alternating")] = 3,
    decode_tokens: Annotated[int, typer.Option(help="Greedy decode steps timed (models with a cache; 0: none)")] = 32,
    block_size: Annotated[int | None, typer.Option(
        help="Run block by block, MB of FP weights per block; 0: whole models [default: whole up to 2 GB together]")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the numbers as JSON instead of a table")] = False,
) -> None:
    """Measure what quantization cost: FP and QUANTIZED side by side on the same data (perplexity or cosine, KL and
    top-1 agreement of next-token distributions, prefill and decode speed)."""
    with _user_errors("interrupted"):
        report = compare_models(fp, quantized, data, samples=samples, seq_len=seq_len, rounds=rounds,
                                decode_tokens=decode_tokens,
                                block_bytes=None if block_size is None else block_size * MB)
    typer.echo(report.to_json() if as_json else report.table())


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so the same clean-up runs (temporary folders removed, no output written).

    Without a handler SIGTERM kills the interpreter at once: no `finally` runs, and the calibration copy of
    the model and the staging folder beside the output stay behind.
    """


def _terminate(signum: int, frame: object) -> None:
    raise Terminated


@contextmanager
def _user_errors(interrupted: str) -> Iterator[None]:
    """A user mistake is one line on stderr and exit 2, never a traceback; Ctrl-C exits 130, SIGTERM 143."""
    try:
        yield
    except SqonnxError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    except Terminated:
        typer.echo(interrupted.replace("interrupted", "terminated"), err=True)
        raise typer.Exit(128 + signal.SIGTERM) from None
    except KeyboardInterrupt:
        typer.echo(interrupted, err=True)
        raise typer.Exit(130) from None


def _check_writable_file(path: Path, option: str) -> None:
    """Checked before hours of work, not after: a report that cannot be written is found at once."""
    if path.is_dir():
        raise SqonnxError(f"{option} {path} is a folder; give a file name such as report.json")
    if not path.parent.is_dir():
        raise SqonnxError(f"{option} {path}: folder {path.parent} does not exist; create it first")


def _alpha(text: str) -> float | str:
    if text == AUTO:
        return AUTO
    try:
        return float(text)
    except ValueError:
        raise SqonnxError(f"--alpha must be a number between 0 and 1 or 'auto', got '{text}'; try 0.5") from None


def _alpha_range(text: str) -> tuple[float, float]:
    try:
        low, high = (float(part) for part in text.split(","))
    except ValueError:
        raise SqonnxError(f"--alpha-range must be LOW,HIGH (two numbers), got '{text}'; try 0.05,0.95") from None
    return low, high


def _level_auto(level: LevelChoice | None, static: bool, dynamic: bool, per_token: bool) -> bool:
    """--level auto, or no level flag at all: O3 with per-token O1 where one static range cannot hold."""
    shorthand = static or dynamic or per_token
    if level is LevelChoice.AUTO and shorthand:
        raise SqonnxError("--level auto contradicts --static/--dynamic/--per-token; drop one")
    return level is LevelChoice.AUTO or (level is None and not shorthand)


def _level(level: Level | None, static: bool, dynamic: bool, per_token: bool) -> Level:
    """--static / --dynamic [--per-token] are short for --level; they must agree with it."""
    if static and (dynamic or per_token):
        raise SqonnxError("--static contradicts --dynamic/--per-token; pick one (or --level O1|O2|O3)")
    if per_token and not dynamic and level is None:
        dynamic = True
    implied = Level.O3 if static else (Level.O1 if per_token else Level.O2) if dynamic else None
    if level is not None and implied is not None and level is not implied:
        raise SqonnxError(f"--level {level.value} contradicts the {implied.value} implied by "
                          f"{'--static' if static else '--dynamic' + (' --per-token' if per_token else '')}; drop one")
    return level or implied or Level.O3


# typer's usage errors (unknown option, bad enum value, missing argument). typer vendors click from 0.2x on
# and re-exports none of its exception classes but BadParameter, whose base is the class wanted.
_USAGE_ERROR: type[Exception] = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")


def main() -> None:
    """Entry point: like `app()`, but a usage error is one line too (typer draws a multi-line box)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    signal.signal(signal.SIGTERM, _terminate)
    try:
        code = app(standalone_mode=False)
    except _USAGE_ERROR as exc:
        context = getattr(exc, "ctx", None)
        command = context.command_path if context is not None else "sqonnx"
        message = " ".join(str(exc.format_message()).split())  # type: ignore[attr-defined]
        typer.echo(f"error: {message} (see '{command} --help')", err=True)
        sys.exit(2)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)
