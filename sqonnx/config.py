"""Typed, validated configuration for one quantization run."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from sqonnx.errors import SqonnxError
from sqonnx.math.quant import CalibMethod, Level
from sqonnx.targets import Target, full_range_is_safe, resolve, rules_of

AUTO = "auto"


class Format(str, enum.Enum):
    """How the quantized graph is written."""

    QDQ = "qdq"  # QuantizeLinear/DequantizeLinear around float ops: portable; runtimes fuse it
    QOPERATOR = "qoperator"  # explicit integer ops: MatMulInteger (+ DynamicQuantizeLinear at O2)


class Unabsorbed(str, enum.Enum):
    """What to do with a smoothing group whose producer cannot absorb 1/s exactly."""

    # Decide per group from calibration rows: pay for an explicit Mul only where it lowers the group's INT8
    # output error by a fifth or more (MiniLM: the post-LN q/k/v and intermediate groups gain; the GELU
    # output's outlier channel is also in the weight, where smoothing makes INT8 worse).
    AUTO = "auto"
    SKIP = "skip"  # leave the group unsmoothed: the graph stays unchanged but for Q/DQ
    MUL = "mul"  # insert an explicit Mul by 1/s in front of the group (costs one elementwise op)


class Weights(str, enum.Enum):
    """How linear layers' weights are stored."""

    INT8 = "int8"  # W8A8: int8 per-channel weights, int8 activations at the layer's level
    # W4A8: onnxruntime's MatMulNBits, 4-bit blocks along the input channels; its CPU kernel quantizes the
    # activations to int8 per row and block itself (accuracy_level 4), so static ranges and --level do not apply.
    # Layers that 4 bits would hurt stay W8A8 (sqonnx.math.search.INT4_ERROR_LIMIT).
    INT4 = "int4"
    # W8A8 in MatMulNBits' form: 8-bit weight blocks, int8 activations per row and block inside the kernel. Its decode
    # is faster than the INT8 GEMM's (no separate activation quantization, one fused kernel), its prefill slower:
    # the decode stage of --decode-weights int8-blocks.
    INT8_BLOCKS = "int8-blocks"

    @property
    def matmul_nbits(self) -> bool:
        """Written as MatMulNBits (formats.nbits)."""
        return self in (Weights.INT4, Weights.INT8_BLOCKS)


class Rounding(str, enum.Enum):
    """How weights are rounded onto their grid (sqonnx.math.gptq)."""

    NEAREST = "nearest"
    GPTQ = "gptq"  # error feedback through the calibration inputs' X^T X (Frantar et al. 2022)


class Provider(str, enum.Enum):
    """Where calibration's onnxruntime sessions run (quantized blocks are always checked on the CPU)."""

    AUTO = "auto"  # CUDA when this onnxruntime has it (onnxruntime-gpu and a GPU), else the CPU, silently
    CPU = "cpu"
    CUDA = "cuda"  # CUDA, or the CPU with a one-line note when there is none


# Every linear layer is quantized by default, the LM head too: it is a quarter of SmolLM2's weights and
# half the bytes a decode step reads while float (onnxruntime-genai decode: 1.7x FP32 with it float in
# issue 13's run, 2.25x with it INT8 in ci/genai_bench.py; SmolLM2 perplexity 12.27 -> 12.31, make quality),
# and --level auto gives it per-token activations where a static range cannot hold its input.
# `--exclude '*lm_head*'` keeps it float.
DEFAULT_EXCLUDE: tuple[str, ...] = ()


# 256 MB of weights per block: SmolLM2 (540 MB) runs as 3 blocks, a Llama-2-7B decoder layer (808 MB) as its
# attention and MLP halves. Blocks add an onnxruntime session each (about a second of set-up on 7B shapes).
MB = 1 << 20
DEFAULT_BLOCK_BYTES = 256 * MB


def block_bytes(megabytes: float) -> int:
    """--block-size in bytes; the one check of it (the CLI's flag and QuantizeConfig.block_bytes)."""
    if not megabytes > 0:
        raise SqonnxError(f"--block-size must be a positive number of MB, got {megabytes:g}; try 256")
    return max(1, int(megabytes * MB))


# CalibrationConfig.own_text's default for --weights int4: GPTQ rounds through X^T X of the calibration inputs, and
# pydoc alone fits it to one register. SmolLM2 W4A8 (issue 27, one run each; pydoc / legal prose / Node.js docs / its
# own text): pydoc alone +8.2 / +14.7 / +10.9 / +17.0 %, an eighth of its own text +7.1 / +15.6 / +9.7 / +14.2 %, a
# quarter +7.0 / +12.0 / +9.5 / +12.4 % (better on all four). W8A8 gains nothing clear from it (legal prose +3.7 %
# -> +6.3 % at an eighth, its own text +6.0 % -> +3.5 %): 0.
OWN_TEXT_SHARE = 0.25
# A static-only target's default --keep-float-budget (perplexity +3 %, or 1 - cosine 0.03, on the check's samples):
# its groups are static everywhere, outlier channels split, and the fewest most sensitive layers stay float until the
# loss fits this (issue 29: SmolLM2 for TensorRT, all 211 layers static at +3.9 %; float only where INT8 costs more)
STATIC_TARGET_BUDGET = 0.03


@dataclass(frozen=True)
class CalibrationConfig:
    """Where calibration samples come from and how many."""

    # A text file or .npz of feeds; several text files, or a folder of them, mix their sources (each source an
    # equal share of the windows). None: the built-in pydoc text (and the model's own text, where it can write it).
    data: Path | tuple[Path, ...] | None = None
    # The quality check's second set, text unlike the calibration data (a text file or an .npz of feeds); None: the
    # model's own text from other seed words where it can write it (sqonnx.calibrators.data), else no second set.
    eval_data: Path | None = None
    num_samples: int = 128
    seq_len: int = 512
    # The share of the calibration windows a decoder that can write (a key/value cache, `logits`, in memory) writes
    # itself, sampled from seed words, beside the built-in pydoc text (sqonnx.calibrators.data); 0: pydoc alone.
    # Not with --calib-data. None: by the weights (QuantizeConfig: OWN_TEXT_SHARE for int4 weights, a decode
    # stage's too; else 0).
    own_text: float | None = None
    # Single tokens run through the key/value cache after the prefill windows (a with-past decoder, text
    # data): decode is what users run, and free-running tokens are what prefill over text cannot show.
    # 0: prefill only.
    decode_steps: int = 64

    def __post_init__(self) -> None:
        if isinstance(self.data, (list, tuple)):
            object.__setattr__(self, "data", tuple(Path(p) for p in self.data) if len(self.data) > 1 else
                               Path(self.data[0]) if self.data else None)
        if self.num_samples < 1:
            raise SqonnxError(f"--num-samples must be at least 1, got {self.num_samples}")
        if self.seq_len < 2:
            raise SqonnxError(f"--seq-len must be at least 2, got {self.seq_len}")
        if self.own_text is not None and not 0 <= self.own_text <= 1:
            raise SqonnxError(f"--own-text must be a share from 0 to 1, got {self.own_text:g}; try 0.25")
        if self.decode_steps < 0:
            raise SqonnxError(f"--decode-steps must be at least 0 (0: prefill only), got {self.decode_steps}")

    @property
    def is_text(self) -> bool:
        """Text to tokenize (pydoc, files, a folder), not an .npz of feeds."""
        return not isinstance(self.data, Path) or self.data.is_dir() or self.data.suffix != ".npz"


@dataclass(frozen=True)
class QuantizeConfig:
    """Options of `sqonnx.quantize`; the CLI maps its flags 1:1 onto these fields."""

    alpha: float | str = 0.5  # or "auto": searched per smoothing group within alpha_range
    alpha_range: tuple[float, float] = (0.05, 0.95)
    calib_method: CalibMethod = CalibMethod.MINMAX
    smooth: bool = True  # False: plain per-tensor W8A8 (the unsmoothed baseline)
    # Fold the smoothing factors and stop: a float model (same outputs as the input, up to rounding) for
    # TensorRT or another quantizer to take over.
    smooth_only: bool = False
    level: Level = Level.O3
    # With level O3: static everywhere but where one static range cannot hold a group's activations
    # (massive-activation tokens: its O3 error on calibration rows is LEVEL_AUTO_RATIO times its per-token
    # error or more); those groups get O1, per-token dynamic INT8, instead of staying in float. The
    # default (--level auto); --static / --level O3 ask for static activations everywhere.
    per_token_where_needed: bool = True
    # Rotate the residual stream by an orthogonal matrix first (QuaRot's R1 and R2, exact in FP32):
    # None: wherever the graph allows it offline (RMSNorm decoders); True: also where run-time rotations
    # are needed (Gemma 3's post-norms); False: never.
    rotate: bool | None = None
    format: Format = Format.QDQ
    # Weight scales per output channel. The paper uses per-tensor weights, but with the 7-bit range
    # below it costs SmolLM2 perplexity 24.2 instead of 16.9 (FP32 11.8); per-channel scales cost no
    # run time in onnxruntime's integer kernels, which scale each output column anyway.
    per_channel: bool = True
    # Where the model will run decides the weight range (see sqonnx.targets): portable and x86 without
    # VNNI need weights in [-63, 63]; reduce_range None means "what the target needs".
    target: Target = Target.PORTABLE
    reduce_range: bool | None = None
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    unabsorbed: Unabsorbed = Unabsorbed.AUTO
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    verify_fusion: bool = True  # ask onnxruntime which kernels the saved model runs
    optimize: bool = False  # run onnxruntime's transformer optimizer (norm/Gelu fusions) before smoothing
    # Leave the fewest most sensitive layers in float until the quality loss (perplexity ratio - 1, or
    # 1 - cosine) on calibration samples is at most this; None: quantize every layer not excluded.
    keep_float_budget: float | None = None
    # The model is calibrated, smoothed, quantized and written one block of at most this many bytes of weights
    # at a time (a decoder layer or two of a 7B model; a segment between two cuts can be larger): memory
    # follows the block, not the model. See sqonnx.streaming.blocks.
    block_bytes: int = DEFAULT_BLOCK_BYTES
    # Keep each finished block's calibration statistics and the values entering the next block here: a killed run
    # resumes, a rerun with other choices skips calibration (see sqonnx.calibrators.cache).
    cache_dir: Path | None = None
    # Calibrate each block on the INT8 output of the blocks before it (GPTQ's sequential mode) instead of the FP
    # model's: the static ranges then fit what the INT8 model really computes.
    sequential: bool = False
    # Every run measures the model it writes against the FP model on this many samples kept back from the
    # statistics (the last ones; in-sample when there are fewer than four samples), next to unsmoothed W8A8 on
    # the same samples; 0: no check. See sqonnx.judgements.quality.
    check_samples: int = 4
    # Write a model even when the check finds it far out of line (sqonnx.judgements.quality.FLOOR); else that is
    # an error.
    allow_lossy: bool = False
    weights: Weights = Weights.INT8
    # None: GPTQ for int4 weights (round-to-nearest loses most there), nearest for int8 (see README).
    weight_rounding: Rounding | None = None
    int4_block: int = 32  # MatMulNBits' block along the input channels: 32 (default), 64 or 128
    # GPTQ's act-order: channels rounded in order of decreasing X^T X diagonal, groups' scales fixed beforehand
    act_order: bool = True
    calibration_provider: Provider = Provider.AUTO
    # A decode stage beside the prompt's (a decoder with its key/value cache): single-token runs take a second copy of
    # the linear layers in this format, from the same calibration, smoothing and rotation; the written graph branches
    # on the token count (io.writer's phases). int4: W4A8 MatMulNBits, the fastest decode (a decode step reads every
    # weight once); int8-blocks: 8-bit MatMulNBits, nearly W8A8's quality. None: one graph for both.
    decode_weights: Weights | None = None

    def __post_init__(self) -> None:
        if self.calibration.own_text is None:
            share = OWN_TEXT_SHARE if Weights.INT4 in (self.weights, self.decode_weights) else 0.0
            object.__setattr__(self, "calibration", replace(self.calibration, own_text=share))
        if self.alpha != AUTO and not (isinstance(self.alpha, (int, float)) and 0.0 <= self.alpha <= 1.0):
            raise SqonnxError(f"--alpha must be between 0 and 1 or 'auto', got {self.alpha}; try 0.5")
        if self.keep_float_budget is not None and self.keep_float_budget < 0:
            raise SqonnxError(f"--keep-float-budget must be >= 0, got {self.keep_float_budget}; try 0.05")
        low, high = self.alpha_range
        if not 0.0 <= low <= high <= 1.0:
            raise SqonnxError(f"--alpha-range must be LOW,HIGH with 0 <= LOW <= HIGH <= 1, got {low},{high}; "
                              "try 0.05,0.95")
        if self.reduce_range is False and not full_range_is_safe(self.target):
            raise SqonnxError(
                f"--full-range saturates int16 sums on x86 CPUs without VNNI (target {resolve(self.target).value}); "
                "pass --target x86-vnni, arm64 or gpu if the model only runs there")
        if self.smooth_only and not self.smooth:
            raise SqonnxError("--smooth-only contradicts --no-smooth; drop one")
        if self.smooth_only and self.keep_float_budget is not None:
            raise SqonnxError("--smooth-only writes a float model; --keep-float-budget has nothing to keep, drop it")
        if self.check_samples < 0:
            raise SqonnxError(f"--check-samples must be >= 0 (0: no quality check), got {self.check_samples}; try 4")
        rules, target = rules_of(self.target), self.target.value
        if rules.qdq_only:
            if self.weights.matmul_nbits:
                raise SqonnxError(f"--weights {self.weights.value} writes MatMulNBits, which {rules.runtime} cannot "
                                  f"import; drop --weights {self.weights.value} for --target {target} (INT8 Q/DQ), "
                                  "or use another --target")
            if self.format is Format.QOPERATOR or self.level is not Level.O3:
                raise SqonnxError(f"--target {target} takes static Q/DQ only; drop "
                                  f"{'--format qoperator' if self.format is Format.QOPERATOR else '--dynamic/--level'}"
                                  " (every group is static there; --keep-float-budget decides which layers stay float)")
        elif rules.static_only and self.level is not Level.O3:
            raise SqonnxError(f"--target {target} writes static int8 activations ({rules.runtime} has no "
                              "DynamicQuantizeLinear); drop --dynamic/--level (every group is static there; "
                              "--keep-float-budget decides which layers stay float)")
        if self.int4_block not in (16, 32, 64, 128, 256):
            raise SqonnxError(f"--int4-block must be 16, 32, 64, 128 or 256, got {self.int4_block}; try 32")
        if self.smooth_only and self.weights.matmul_nbits:
            raise SqonnxError(f"--smooth-only writes a float model; --weights {self.weights.value} has nothing to "
                              "quantize, drop one")
        if self.block_bytes < 1:
            block_bytes(self.block_bytes / MB)  # raises the --block-size message
        if self.decode_weights is not None:
            self._check_decode()
        for pattern in self.exclude:
            if not pattern:
                raise SqonnxError("--exclude got an empty pattern; give a node-name glob like '*lm_head*'")

    def _check_decode(self) -> None:
        decode = self.decode_weights
        assert decode is not None
        if not decode.matmul_nbits:
            raise SqonnxError(f"--decode-weights {decode.value} is not a decode format; try --decode-weights int4 "
                              "(W4A8 MatMulNBits for the decode stage, W8A8 for the prompt) or int8-blocks")
        if self.weights is not Weights.INT8:
            raise SqonnxError(f"--decode-weights {decode.value} gives the prompt stage W8A8 and the decode stage "
                              f"{decode.value}; drop --weights {self.weights.value} (or --decode-weights, for one "
                              "graph)")
        if self.smooth_only:
            raise SqonnxError("--smooth-only writes a float model; --decode-weights has nothing to quantize, drop one")
        rules = rules_of(self.target)
        if rules.qdq_only:
            raise SqonnxError(f"--decode-weights writes MatMulNBits, which {rules.runtime} cannot import; drop "
                              f"--decode-weights for --target {self.target.value}")

    @property
    def decode_config(self) -> QuantizeConfig | None:
        """How the decode stage's layers are built (None: no decode stage). Its smoothing is the prompt stage's, so
        that the key/value cache one stage writes is what the other reads (run.build.build's `smoothing`)."""
        if self.decode_weights is None:
            return None
        return replace(self, weights=self.decode_weights, decode_weights=None, keep_float_budget=None, sequential=False)

    @property
    def rounding(self) -> Rounding:
        if self.weight_rounding is not None:
            return self.weight_rounding
        return Rounding.GPTQ if self.weights is Weights.INT4 else Rounding.NEAREST

    @property
    def gptq(self) -> bool:
        """Whether this run's layers are rounded with GPTQ."""
        return self.rounding is Rounding.GPTQ and not self.smooth_only

    @property
    def needs_hessians(self) -> bool:
        """Whether calibration must sum X^T X per activation (GPTQ here, or in the decode stage)."""
        decode = self.decode_config
        return self.gptq or (decode is not None and decode.gptq)

    @property
    def alpha_auto(self) -> bool:
        return self.alpha == AUTO

    @property
    def alpha_grid(self) -> tuple[float, ...]:
        """α candidates of the search: 0.05 steps within alpha_range, ends included."""
        low, high = self.alpha_range
        steps = int(round((high - low) / 0.05))
        return tuple(sorted({round(low + i * (high - low) / max(steps, 1), 4) for i in range(steps + 1)}))

    @property
    def needs_rows(self) -> bool:
        """Whether calibration must keep activation rows (searches), not only maxima."""
        return (self.smooth and (self.alpha_auto or self.unabsorbed is Unabsorbed.AUTO)
                or self.float_budget is not None or self.level_auto or self.weights.matmul_nbits
                or (self.decode_weights is not None and self.decode_weights.matmul_nbits)
                or (self.calib_method is not CalibMethod.MINMAX and self.level is Level.O3))

    @property
    def level_auto(self) -> bool:
        """Per-layer level: O3, and O1 where a static range cannot hold the activations. A static-only target has no
        O1: there every group is static, and `float_budget` decides which layers stay float."""
        return self.per_token_where_needed and self.level is Level.O3 and not rules_of(self.target).static_only

    @property
    def float_budget(self) -> float | None:
        """--keep-float-budget; by default, STATIC_TARGET_BUDGET for a static-only target's smoothed INT8 (what --level
        auto is there; --static writes every layer INT8). None: every layer not excluded is quantized."""
        if self.keep_float_budget is not None:
            return self.keep_float_budget
        if rules_of(self.target).static_only and self.per_token_where_needed and self.level is Level.O3 and \
                not self.smooth_only and self.weights is Weights.INT8 and self.decode_weights is None:
            return STATIC_TARGET_BUDGET
        return None

    @property
    def splits_channels(self) -> bool:
        """Outlier channels split (sqonnx.passes.split_channels): every layer static INT8, smoothed."""
        return (self.smooth and not self.smooth_only and self.level is Level.O3 and not self.level_auto
                and self.weights is Weights.INT8)

    @property
    def integer_form(self) -> bool:
        """Explicit integer ops: asked for, or O1, whose per-token scales have no Q/DQ spelling. (With
        --level auto the O1 layers are written with integer ops and the rest in this form.)"""
        return self.format is Format.QOPERATOR or self.level is Level.O1 or rules_of(self.target).integer_ops

    @property
    def format_used(self) -> Format:
        return Format.QOPERATOR if self.integer_form else Format.QDQ

    @property
    def reduced_range(self) -> bool:
        return self.reduce_range if self.reduce_range is not None else not full_range_is_safe(self.target)

    @property
    def weight_qmax(self) -> int:
        return 63 if self.reduced_range else 127

    def is_excluded(self, node_name: str) -> bool:
        return any(_glob_to_regex(p).fullmatch(node_name) for p in self.exclude)


def tool_version() -> str:
    """sqonnx's installed version (metadata, cache keys)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sqonnx")
    except PackageNotFoundError:
        return "unknown"


def _glob_to_regex(pattern: str) -> re.Pattern[str]:
    # fnmatch treats '[' specially; node names like '/model/layers.0/...' never need classes.
    return re.compile(".*".join(re.escape(part) for part in pattern.split("*")))
