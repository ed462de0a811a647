"""The passes over the blocks of a model that quantize it: calibrate, smooth and quantize, judge, write.

The first pass calibrates every block on every sample and writes the requested build into its stage.
`--alpha auto`'s candidates (per-group α and single α values) are built, judged on held-back samples and each
staged in that same pass; the losers' stages are dropped. `--keep-float-budget` runs a pass per trial (statistics
reused, no calibration), each trial with float layers staged; the last one is the output. Each stage gets each
block once, and nothing is rebuilt to be written. Each block is freed before the next one is read, so memory
follows the largest block; the staged candidates take disk: --alpha auto about four outputs until the choice,
--keep-float-budget two.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import onnx_ir as ir

from sqonnx.calibrators.carry import Carry
from sqonnx.calibrators.channel_max import ActivationStats
from sqonnx.calibrators.data import LOGITS
from sqonnx.config import QuantizeConfig, Rounding
from sqonnx.errors import SqonnxError
from sqonnx.formats import NBITS_LEVELS, primary
from sqonnx.graph.layers import find_linear_layers, output_layer
from sqonnx.graph.tensors import opset_version, prefetch
from sqonnx.io.writer import DECODE, Stage, StreamingWriter, no_space
from sqonnx.judgements.decisions import choose_alpha, judge_head, keep_float_done
from sqonnx.judgements.layer_report import LayerReport
from sqonnx.judgements.quality import HeadVerdict, QualityCheck, RotationJudge, loss_noise
from sqonnx.passes.smoothing_groups import find_smoothing_groups, statistics_needed
from sqonnx.passes.transposed import FOLDED_TENSOR
from sqonnx.pause import pause_point
from sqonnx.run.build import Built, build
from sqonnx.run.front import Prepared
from sqonnx.run.progress import Progress, free_memory
from sqonnx.runtime.kernels import KernelCheck, count_kernels
from sqonnx.runtime.session import PREPACK_TOKENS, cpu_runs, open_session
from sqonnx.streaming.blocks import Block
from sqonnx.streaming.runner import (
    CARRY_MEMORY_BYTES,
    BlockRunner,
    Comparison,
    block_initializers,
    calibrate_block,
    extract_block,
    forward_block,
    release_block,
    run_track_block,
    time_fp_block,
)
from sqonnx.targets import rules_of, worst_int16_pair_in_graph

logger = logging.getLogger(__name__)

# Activation rows kept from calibration for the α search and clipping (float16: 512 x 1536 x 2 bytes =
# 1.5 MB for SmolLM2's widest activation, 110 MB over its 120 activations).
KEPT_ROWS = 512
# Single α values --alpha auto's per-group choice must beat on the whole model (within --alpha-range).
UNIFORM_ALPHAS = (0.25, 0.5, 0.75)
# Calibration samples --keep-float-budget measures each trial on.
EVAL_SAMPLES = 4
# Statistics kept in memory for later passes (--alpha auto, --keep-float-budget), in all; the rest on disk.
KEPT_STATS_BYTES = 256 << 20
# FP outputs kept in memory for comparisons (the rest in the scratch folder).
REFERENCE_MEMORY_BYTES = 32 << 20
# The quality check's yardstick (unsmoothed W8A8) builds every block a second time: measured up to this size.
BASELINE_MAX_BYTES = 2 << 30


@dataclass
class BlockPassResult:
    """What building a staged track's blocks found, block by block (its layers, kernels, TensorRT's rules)."""

    layer_reports: list[LayerReport] = field(default_factory=list)
    quantized_layers: int = 0
    sensitivity: dict[str, float] = field(default_factory=dict)
    kernels: KernelCheck | None = None
    worst_pair: int = 0
    rotation_errors: dict[str, tuple[float, float]] = field(default_factory=dict)  # see build.Built
    checked_nodes: int = 0  # nodes written and checked against the target's rules (--target tensorrt: Q/DQ)


@dataclass
class Track:
    """One way of building the INT8 model, judged on evaluation samples (`keys`) against the FP model."""

    name: str
    config: QuantizeConfig
    float_layers: frozenset[str] = frozenset()
    keys: set[int] = field(default_factory=set)
    # on the keys of the quality check's second set (`other_keys`: text unlike the calibration's), and on the rest
    other_keys: frozenset[int] = frozenset()
    other: Comparison = field(default_factory=Comparison)
    domain: Comparison = field(default_factory=Comparison)
    timed: dict[str, float] = field(default_factory=dict)
    # Built only from the first block where it differs (its float layers) on, from `fork_of`'s carried values
    # there: judging the LM head float costs one build of the last block, not of every block.
    fork_of: Track | None = None
    # A candidate output: its blocks are written there as they are built (or, where a fork of it wins, the fork's),
    # and `result` gathers what they hold. None: a track that is only measured.
    stage: Stage | None = None
    result: BlockPassResult = field(default_factory=BlockPassResult)
    # A decode stage's track: its blocks go to `stage`'s decode branch (io.writer.DECODE), smoothed as `smoothing`
    # (the prompt stage's config) smooths them.
    branch: str = ""
    smoothing: QuantizeConfig | None = None

    @property
    def comparison(self) -> Comparison:
        """On every key: what the alpha search, the LM head's verdict and --keep-float-budget judge by."""
        return self.domain.merged(self.other)

    def comparison_of(self, key: int) -> Comparison:
        return self.other if key in self.other_keys else self.domain


@dataclass
class PassSummary:
    """What a pass over the blocks found beside its tracks."""

    fp_seconds: float = 0.0  # the FP model's time on the timing sample (--keep-float-budget's speedups)
    resumed: int = 0  # blocks whose calibration an earlier run left in --cache-dir
    head: HeadVerdict | None = None  # the quantized LM head judged against a float one, where its block was built
    decode_head: HeadVerdict | None = None  # the same for the decode stage's (--decode-weights)


@dataclass
class KeepFloatTrial:
    float_layers: list[str]
    quality_loss: float
    speedup: float  # FP time / this model's time, one forward of the first evaluation sample (block by block)
    chosen: bool = False  # the trial written (the fewest float layers that fit the budget)


@dataclass
class Outcome:
    """What the passes chose and where it is staged."""

    config: QuantizeConfig
    result: BlockPassResult
    stage: Stage
    alpha_trials: dict[str, float] = field(default_factory=dict)
    keep_float: list[KeepFloatTrial] = field(default_factory=list)
    resumed: int = 0  # blocks whose calibration an earlier run left in --cache-dir
    check: QualityCheck | None = None  # the written model against the FP model (None: --check-samples 0)
    head: HeadVerdict | None = None  # the INT8 LM head judged against a float one (None: not judged)
    decode: BlockPassResult | None = None  # the decode stage's layers (--decode-weights)
    decode_check: QualityCheck | None = None  # the decode stage's layers on the check's samples
    decode_head: HeadVerdict | None = None  # the decode stage's LM head judged against a float one

    @property
    def kept_float(self) -> list[str]:
        """The layers --keep-float-budget's search left float in the model written (none without a search)."""
        return next((trial.float_layers for trial in self.keep_float if trial.chosen), [])


def _check(written: Track, baseline: Track | None, held_out: bool, other: str = "") -> QualityCheck | None:
    """The quality check on the calibration-like samples, with the second set's (`other`: what it is) beside it."""
    paired = baseline is not None and written.keys - written.other_keys == baseline.keys - baseline.other_keys
    check = _measure(written.domain, baseline.domain if baseline else None, written, baseline, held_out, paired)
    second = _measure(written.other, baseline.other if baseline else None, written, baseline, True,
                      baseline is not None and written.other_keys == baseline.other_keys)
    if check is None or second is None:
        return check or second
    return replace(check, other=replace(second, name=other))


def _measure(comparison: Comparison, base: Comparison | None, written: Track, baseline: Track | None,
             held_out: bool, paired: bool) -> QualityCheck | None:
    """One set's check. `paired`: the written model and the baseline ran the same samples (in order:
    BlockRunner.forward); --keep-float-budget's trials ran other calibration-like samples, the same second set."""
    if not comparison.cosines:
        return None
    measured = base is not None and bool(base.cosines)
    noise = loss_noise(comparison.sample_losses, base.sample_losses, paired) if measured and base else None
    return QualityCheck(len(comparison.cosines), held_out, comparison.language_model and comparison.tokens > 0,
                        comparison.quality_loss, comparison.output_error,
                        base.quality_loss if measured and base else None,
                        base.output_error if measured and base else None,
                        baseline.name if baseline else baseline_name(written.config), comparison.mean_kl, noise)


def baseline_name(config: QuantizeConfig) -> str:
    return primary(config).yardstick()


def _head_kind(reports: list[LayerReport], head: frozenset[str]) -> str:
    """How the LM head is quantized in a build: W4A8, W8A8 blocks or INT8."""
    return next((r.level for r in reports if r.name in head and r.level in NBITS_LEVELS), "INT8")


@dataclass(frozen=True)
class _Build:
    """A track's block built in a pass, with the kernels onnxruntime runs for it (None: not checked)."""

    built: Built
    kernels: KernelCheck | None


def _as_written(track: Track, forks: list[Track], head: HeadVerdict | None) -> Track:
    """The track whose comparison measures what `track`'s stage holds: its fork where the float LM head won."""
    fork = next((f for f in forks if f.fork_of is track), None)
    return fork if fork is not None and head is not None and head.loses else track


def _signature(model: ir.Model) -> tuple[object, ...]:
    """What onnxruntime's fusions of a quantized block depend on: its ops in order, with the types of their
    inputs (names and weights aside)."""
    return tuple((node.op_type, node.domain, tuple(None if v is None else v.dtype for v in node.inputs),
                  tuple(sorted((k, str(a.value)) for k, a in node.attributes.items()
                               if a.type != ir.AttributeType.TENSOR)))
                 for node in model.graph)


class Pipeline:
    """The passes over one prepared model's blocks (`front`). `verify`: check which kernels onnxruntime runs for the
    written blocks; `rotation`: judge the rotation as blocks are built; `providers`: calibration's (None: the CPU).
    Holds what the passes share: the values carried between blocks, the FP outputs compared with, the statistics
    kept for later passes."""

    def __init__(self, front: Prepared, workdir: Path, progress: Progress, *, verify: bool = False,
                 rotation: RotationJudge | None = None,
                 providers: list[str | tuple[str, dict[str, str]]] | None = None) -> None:
        self.model, self.part, self.samples = front.model, front.partition, front.samples
        self.quantized, self.cache = front.quantized, front.cache
        self.rotation = rotation
        self.providers = providers
        self.workdir = workdir
        self.progress = progress
        self.verify = verify
        self.runner = BlockRunner(self.part, self.samples)
        self.fp_carry = Carry(workdir / "carry", CARRY_MEMORY_BYTES)
        # --sequential: the counted samples' values as the INT8 blocks before computed them
        self.stream = Carry(workdir / "stream", CARRY_MEMORY_BYTES)
        # the FP outputs the quality check and the searches compare with: logits are large (SmolLM2: 100 MB a
        # sample) and read once per track, so they wait on disk
        self.references = Carry(workdir / "references", REFERENCE_MEMORY_BYTES)
        self.stats: dict[int, Path | ActivationStats] = {}
        self.shared = {id(v.const_value) for v in self.model.graph.initializers.values()}
        self._kept_bytes = 0
        first = self.part.graph_outputs[0] if self.part.graph_outputs else ""
        # the block before the one that makes the model's first output: where a run that compares outputs
        # with the FP model's resumes from --cache-dir
        self.before_output = next((b.index for b in self.part.blocks if first in b.outputs), 0) - 1

    def quantize(self, config: QuantizeConfig, writer: StreamingWriter) -> Outcome:
        samples = self.samples
        search = bool(samples.held_out) and config.alpha_auto and config.smooth and not config.smooth_only
        # every judgement also looks at the quality check's second set, text unlike the calibration data: what wins
        # on calibration-like samples alone can lose on the user's own text
        other = frozenset(samples.other_keys)
        primary = Track("per group" if config.alpha_auto else "requested", config,
                        keys=set(samples.held_out_keys if search else samples.check_keys) | other, other_keys=other,
                        stage=writer.stage("requested"))
        tracks = [primary]
        # --alpha auto: single α values beside the per-group choice, each staged as it is built, judged on the
        # held-back samples' outputs once the last block has run
        uniform: list[Track] = []
        if search:
            low, high = config.alpha_range
            uniform = [Track(str(alpha), replace(config, alpha=alpha), keys=set(samples.held_out_keys) | other,
                             other_keys=other,
                             stage=writer.stage(f"alpha-{alpha}")) for alpha in UNIFORM_ALPHAS if low <= alpha <= high]
            tracks += uniform
        keep_float = config.float_budget is not None
        eval_keys = set(range(min(EVAL_SAMPLES, samples.calibration_count))) | other if keep_float else set()
        trial0 = primary
        if keep_float and primary.keys:
            trial0 = Track("keep-float 0", config, keys=eval_keys, other_keys=other)
            tracks.append(trial0)
        elif keep_float:
            primary.keys = eval_keys
        # the quality check's yardstick: plain W8A8 on the same samples (another build of every block: not on
        # models over BASELINE_MAX_BYTES)
        baseline = None
        if primary.keys and config.smooth and not config.smooth_only and \
                self.part.total_bytes <= BASELINE_MAX_BYTES:
            # (an int4 run's: unsmoothed W4A8 rounded to nearest, what onnxruntime's MatMulNBitsQuantizer writes)
            baseline = Track(baseline_name(config), replace(
                config, smooth=False, alpha=0.5, keep_float_budget=None, sequential=False,
                weight_rounding=Rounding.NEAREST), keys=set(primary.keys), other_keys=other)
            tracks.append(baseline)
        # a language model's LM head (the layer computing `logits`) float beside the INT8 one: INT8 only where it
        # pays. Judged once, on the requested track; every staged candidate has a fork for the verdict to pick.
        head = output_layer(self.model.graph) if self.part.graph_outputs[:1] == [LOGITS] else None
        forks: list[Track] = []
        if head is not None and head.name in self.quantized and len(self.quantized) > 1 and primary.keys \
                and not keep_float and not config.smooth_only:
            forks = [Track("float LM head", t.config, frozenset({head.name}), keys=set(t.keys), other_keys=other,
                           fork_of=t)
                     for t in (primary, *uniform)]
            tracks += forks
        # --decode-weights: the decode stage's layers are built in this pass where the smoothing is known before it
        # (no α search, no float layers to find), with a fork of their own for their LM head's verdict; else in a
        # pass of their own once it is decided (the statistics kept for it)
        decode = None
        if config.decode_weights is not None and not search and not keep_float:
            assert primary.stage is not None
            decode = self._decode_track(config, primary.stage, frozenset())
            tracks.append(decode)
            if forks:
                tracks.append(Track("decode stage, float LM head", decode.config, forks[0].float_layers,
                                    keys=set(decode.keys), other_keys=other, fork_of=decode, branch=DECODE,
                                    smoothing=decode.smoothing))
                forks.append(tracks[-1])
        references = set().union(*(t.keys for t in tracks))
        summary = self.run_pass("quantizing", tracks, writer, calibrate=True, references=references,
                                keep_stats=keep_float or search, timing_key=min(eval_keys) if keep_float else None)
        assert primary.stage is not None
        outcome = Outcome(config, primary.result, primary.stage, resumed=summary.resumed, head=summary.head,
                          decode_head=summary.decode_head)
        if outcome.head is not None:
            logger.info("LM head: %s", outcome.head.summary())
        written = _as_written(primary, forks, outcome.head)
        if search:
            judged = [primary, *uniform]
            outcome.alpha_trials = {t.name: t.comparison.output_error for t in judged}
            best = judged[choose_alpha([t.comparison.output_error for t in judged])]
            logger.info("--alpha auto: %s", ", ".join(f"{k} {v:.4f}" for k, v in outcome.alpha_trials.items()))
            for track in judged:
                if track is not best and track.stage is not None:
                    track.stage.drop()
            if best is not primary:
                assert best.stage is not None
                outcome.config, outcome.result, outcome.stage = best.config, best.result, best.stage
                written = _as_written(best, forks, outcome.head)
        if keep_float:
            written = self._keep_float(outcome, trial0, primary.result.sensitivity, summary.fp_seconds, eval_keys,
                                       writer)
        held_out = samples.held_out > 0 and written.keys - other <= set(samples.held_out_keys)
        outcome.check = _check(written, baseline, held_out, samples.feeds.other_description)
        if decode is not None:
            self._decode_outcome(outcome, decode, _as_written(decode, forks, outcome.decode_head))
        elif config.decode_weights is not None:
            self._decode_stage(outcome, written, writer)
        return outcome

    def _decode_track(self, config: QuantizeConfig, stage: Stage, float_layers: frozenset[str]) -> Track:
        """The decode stage's layers (--decode-weights) as `config` smooths them, into `stage`'s decode branch; judged
        on the check's samples, every token at once (the decode layers' own error, not the cache's)."""
        decode = config.decode_config
        assert decode is not None
        other = frozenset(self.samples.other_keys)
        return Track("decode stage", decode, float_layers, keys=set(self.samples.check_keys) | other,
                     other_keys=other, stage=stage, branch=DECODE, smoothing=config)

    def _decode_stage(self, outcome: Outcome, written: Track, writer: StreamingWriter) -> None:
        """--decode-weights after an α search or --keep-float-budget: one more pass over the blocks (statistics kept, no
        calibration) builds the decode stage's layers with the chosen smoothing and float layers."""
        track = self._decode_track(outcome.config, outcome.stage, written.float_layers)
        self.run_pass("decode stage", [track], writer)
        self._decode_outcome(outcome, track, track)

    def _decode_outcome(self, outcome: Outcome, track: Track, written: Track) -> None:
        samples = self.samples
        outcome.decode = track.result
        held_out = samples.held_out > 0 and written.keys - written.other_keys <= set(samples.held_out_keys)
        outcome.decode_check = _check(written, None, held_out, samples.feeds.other_description)

    def _keep_float(self, outcome: Outcome, trial0: Track, sensitivity: dict[str, float], fp_seconds: float,
                    eval_keys: set[int], writer: StreamingWriter) -> Track:
        """Leave the fewest most sensitive layers in float for the quality loss to fit the budget: 1, 2, 4, ... until
        it fits (`keep_float_done`), then halving the gap to the last count that did not (a SmolLM2 for TensorRT fit
        at 16, not at 8: the count it needs lies between). Each trial with float layers is staged as it is built; the
        one chosen (`KeepFloatTrial.chosen`: the fewest that fit, else the last of the doubling) is the model
        written. Returns its track (its comparison measured on `eval_keys`)."""
        config = outcome.config
        budget = config.float_budget
        assert budget is not None
        ranking = sorted(sensitivity, key=lambda name: -sensitivity[name])
        best: tuple[int, Track] | None = None  # the fewest float layers that fit so far, and their trial
        last: tuple[int, Track] | None = None

        def trial(count: int) -> Track:
            chosen = frozenset(ranking[:count])
            if count == 0 and trial0.config is config:
                done = trial0
            else:
                done = Track(f"keep-float {count}", config, chosen, keys=eval_keys, other_keys=trial0.other_keys,
                             stage=writer.stage(f"keep-float-{count}") if chosen else None)
                self.run_pass(f"keep-float trial {count}", [done], writer)
            loss = done.comparison.quality_loss
            speed = fp_seconds / done.timed["seconds"] if done.timed.get("seconds") else 0.0
            outcome.keep_float.append(KeepFloatTrial(list(ranking[:count]), loss, speed))
            logger.info("keep-float: %d layers in float -> quality loss %.4f", count, loss)
            return done

        def keep(count: int, done: Track) -> None:
            """`done` replaces the trial held so far as the one to write; the other's stage is dropped."""
            nonlocal best
            if best is not None and best[1].stage is not None and best[1] is not done:
                best[1].stage.drop()
            best = (count, done)

        count, failed = 0, -1
        while True:  # doubling
            done = trial(count)
            if done.comparison.quality_loss <= budget:
                keep(count, done)
                break
            if keep_float_done(done.comparison.quality_loss, budget, count, len(ranking)):
                last = (count, done)
                break
            if count and done.stage is not None:
                done.stage.drop()
            failed, count = count, 1 if count == 0 else 2 * count
        while best is not None and best[0] - failed > 1:  # halving the gap to the last count that did not fit
            middle = (failed + best[0]) // 2
            done = trial(middle)
            if done.comparison.quality_loss <= budget:
                keep(middle, done)
            else:
                failed = middle
                if done.stage is not None:
                    done.stage.drop()
        if best is None:
            assert last is not None
            logger.warning("--keep-float-budget %.3g not met with %d of %d layers in float (loss %.4f); keeping those",
                           budget, last[0], len(ranking), last[1].comparison.quality_loss)
            best = last
        chosen_count, chosen = best
        for index, found in enumerate(outcome.keep_float):
            if len(found.float_layers) == chosen_count:
                outcome.keep_float[index] = replace(found, chosen=True)
        if chosen.stage is not None and chosen is not trial0:
            outcome.stage.drop()
            outcome.result, outcome.stage = chosen.result, chosen.stage
        return chosen

    def run_pass(self, label: str, tracks: list[Track], writer: StreamingWriter, *, calibrate: bool = False,
                 references: set[int] | frozenset[int] = frozenset(), keep_stats: bool = False,
                 timing_key: int | None = None) -> PassSummary:
        """One pass over the blocks: calibrate (first pass), build and judge each track, write each staged track's
        block (or its fork's, where the fork wins) into its stage."""
        summary = PassSummary()
        for track in tracks:
            if track.stage is not None:
                track.result = BlockPassResult(kernels=KernelCheck() if self.verify else None)
        checked: dict[tuple[object, ...], tuple[int, KernelCheck]] = {}  # per block pattern: where, what it ran
        carries = {id(t): Carry(self.workdir / f"track-{n}", CARRY_MEMORY_BYTES) for n, t in enumerate(tracks)}
        progress = self.progress
        progress.start_pass(label, self.part.blocks)
        # --sequential: calibration reads what the first track's INT8 blocks compute
        sequential = calibrate and tracks[0].stage is not None and tracks[0].config.sequential
        resume = self._resume_point(references, sequential) if calibrate else -1
        forked: set[int] = set()
        if calibrate:
            summary.resumed = resume + 1
        for block in self.part.blocks:
            runs = self.samples.total_runs if calibrate and block.index > resume else sum(len(t.keys) for t in tracks)
            if block.index + 1 < len(self.part.blocks):
                prefetch(block_initializers(self.part.blocks[block.index + 1]))
            with progress.block(block, runs):
                with progress.phase("read and rotate"):
                    fp = extract_block(self.model, block)
                here = {layer.name for layer in find_linear_layers(fp.graph)} & self.quantized
                if calibrate and block.index > resume:
                    stats = self._calibrate(block, fp, tracks[0].config, references, sequential)
                    if keep_stats:
                        self._keep(block.index, stats)
                    if self.cache is not None:
                        self.cache.save_stats(block.index, stats)
                    if timing_key is not None:
                        timed: dict[str, float] = {}
                        with progress.phase("calibrate"):
                            time_fp_block(self.runner, block, fp, self.fp_carry, timing_key, timed)
                        summary.fp_seconds += timed.get("seconds", 0.0)
                elif calibrate:
                    assert self.cache is not None
                    stats = self.cache.stats(block.index) or ActivationStats({})
                    summary.fp_seconds = float("nan")  # resumed: the FP model's own time is not measured
                    if keep_stats:
                        self._keep(block.index, stats)
                else:
                    stats = self._load(block.index)
                built: dict[int, _Build] = {}
                for number, track in enumerate(tracks):
                    if track.fork_of is not None and id(track) not in forked:
                        if not track.float_layers & here:
                            continue  # built as the track it forks from: its values are that track's
                        carries[id(track)].copy_from(carries[id(track.fork_of)])
                        forked.add(id(track))
                    last = number == len(tracks) - 1
                    candidate = track.stage is not None or (track.fork_of is not None and
                                                            track.fork_of.stage is not None)
                    build_ = self._build_track(block, fp if last else fp.clone(), stats, here, track, candidate,
                                               carries[id(track)], writer, checked, sequential and number == 0)
                    if candidate:
                        built[id(track)] = build_
                self._write(block, tracks, built, summary)
                self.runner.finish_block(block, self.fp_carry)
                self.runner.finish_block(block, self.stream)
                if self.cache is not None and calibrate and block.index > resume and \
                        self._resumable(references, sequential):
                    with progress.phase("cache"):
                        self.cache.save_carry(block.index, self._calibration_carry(sequential),
                                              keep=self.before_output)
                    pause_point(f"block-{block.index}")
                for carry in carries.values():
                    self.runner.finish_block(block, carry)
                del fp
                release_block(self.model, block)
                free_memory()
        if self.cache is not None and calibrate and references and self._resumable(references, sequential):
            self.cache.save_references(self.references)
        for carry in carries.values():
            carry.clear()
        return summary

    def calibrated_blocks(self, config: QuantizeConfig) -> Iterator[tuple[ir.Model, ActivationStats]]:
        """Each block (its FP model, as quantize would smooth it) with its calibration statistics, one at a time:
        what `sqonnx inspect` reports on."""
        self.progress.start_pass("calibrating", self.part.blocks)
        for block in self.part.blocks:
            with self.progress.block(block, self.samples.total_runs):
                with self.progress.phase("read and rotate"):
                    fp = extract_block(self.model, block)
                stats = self._calibrate(block, fp, config, frozenset(), rows=True)
                yield fp, stats
                self.runner.finish_block(block, self.fp_carry)
                del fp
                release_block(self.model, block)
                free_memory()

    def _resume_point(self, references: set[int] | frozenset[int], sequential: bool) -> int:
        """The last block calibrated by an earlier run of the same key (--cache-dir), -1 when none; not past the
        block before the one that makes the model's first output when this run compares outputs with the FP
        model's (those are not kept)."""
        if self.cache is None:
            return -1
        if not self._resumable(references, sequential):
            return -1
        # the FP outputs compared with are kept too: without them a run resumes before the block that makes them
        kept = bool(references) and set(references) <= self.cache.references()
        resume = self.cache.resume_after(len(self.part.blocks),
                                         self.before_output if references and not kept else None)
        if resume >= 0:
            self.cache.load_carry(resume, self._calibration_carry(sequential))
            if kept:
                self.cache.load_references(self.references)
            logger.info("--cache-dir: blocks 1-%d calibrated by an earlier run", resume + 1)
        return resume

    def _calibration_carry(self, sequential: bool) -> Carry:
        """Where the counted samples' values are carried: the INT8 stream with --sequential, else the FP one."""
        return self.stream if sequential else self.fp_carry

    @staticmethod
    def _resumable(references: set[int] | frozenset[int], sequential: bool) -> bool:
        """--sequential keeps two streams (INT8 for calibration, FP for the outputs compared with): a run that
        compares outputs calibrates from the start."""
        return not (sequential and references)

    def _calibrate(self, block: Block, fp: ir.Model, config: QuantizeConfig, references: set[int] | frozenset[int],
                   sequential: bool = False, rows: bool = False) -> ActivationStats:
        """Statistics of every group of the block (excluded layers too: a cached block then serves any later
        --exclude), with rows whenever a choice may need them, they are cached, or `rows`."""
        with self.progress.phase("calibrate"):
            every = {layer.name for layer in find_linear_layers(fp.graph)}
            request = statistics_needed(find_smoothing_groups(fp.graph), every)
            keep_rows = KEPT_ROWS if rows or config.needs_rows or self.cache is not None else 0
            return calibrate_block(self.runner, block, fp, request.channel_max, request.probes, keep_rows,
                                   self.fp_carry, set(references), self.references, self.progress.tick,
                                   self.stream if sequential else None, gram=config.needs_hessians,
                                   providers=self.providers)

    def _build_track(self, block: Block, fp: ir.Model, stats: ActivationStats, here: set[str], track: Track,
                     candidate: bool, carry: Carry, writer: StreamingWriter,
                     checked: dict[tuple[object, ...], tuple[int, KernelCheck]], calibrating: bool = False) -> _Build:
        """Build `track`'s block and run its samples. A `candidate` for writing (a staged track, or a track that
        forks from one) also gets its kernels checked; the block's graph and its kernels are returned."""
        with self.progress.phase("smooth and quantize"):
            built = build(fp, track.config, stats, here - track.float_layers,
                          sensitivities=candidate and track.config.float_budget is not None
                          and not track.float_layers,
                          rotation=self.rotation if candidate and not track.branch else None,
                          smoothing=track.smoothing)
        for value in built.model.graph.initializers.values():
            value.meta.pop(FOLDED_TENSOR, None)  # the materialized table copy: not to be kept with the written graph
        check = candidate and self.verify and bool(built.quantized) and not track.config.smooth_only
        signature = _signature(built.model) if check else ()
        found = None
        if check and signature in checked:
            # onnxruntime's fusions depend on the graph's pattern only: a block with the very ops and levels of a
            # block already checked runs the same kernels (a 7B model has 64 alike), and its check is skipped; this
            # very block built alike for another candidate (--alpha auto) counts as checked
            where, repeated = checked[signature]
            found = repeated if where == block.index else replace(
                repeated, unfused=[f"{name} (and alike in block {block.index})" for name in repeated.unfused],
                checked_blocks=0)
            check = False
        # --sequential: the next block is calibrated on what this INT8 block computes from the INT8 blocks before
        sequential = calibrating and track.config.sequential and bool(built.quantized)
        if track.keys or check or sequential:
            with self.progress.phase("check"):
                optimized = self.workdir / f"kernels-{block.index}.onnx" if check else None
                try:
                    # a bfloat16 block runs upcast here (no CPU kernels), as calibration ran it
                    session = open_session(built.model, float32=not cpu_runs(built.model), optimized_path=optimized,
                                           prepack=self.samples.tokens(len(track.keys)) >= PREPACK_TOKENS,
                                           what=f"the quantized block {block.index} ({block.label})")
                except SqonnxError as exc:
                    if optimized is not None and "Failed to write" in str(exc):  # the scratch folder is full
                        raise SqonnxError(no_space(self.workdir.parent.parent, writer)) from None
                    raise
                if optimized is not None:
                    found = count_kernels(optimized)
                    found.checked_blocks += 1
                    checked[signature] = (block.index, found)
                if track.keys:
                    run_track_block(self.runner, block, session, carry, track.keys, self.references,
                                    track.comparison_of, track.timed)
                if sequential:
                    forward_block(self.runner, block, session, self.stream, self.samples.counted_keys,
                                  self.progress.tick)
                del session
        return _Build(built, found)

    def _write(self, block: Block, tracks: list[Track], built: dict[int, _Build], summary: PassSummary) -> None:
        """Write each staged track's block as it built it, or as its fork built it where the fork wins (the LM
        head float, judged on the first staged track once it and its fork have run the check's samples through the
        block that makes the first output)."""
        for branch in ("", DECODE):  # the prompt stage's verdict, from its first staged candidate; the decode stage's
            for fork in tracks:
                parent = fork.fork_of
                if parent is not None and fork.branch == branch and id(fork) in built and id(parent) in built and \
                        fork.comparison.cosines:
                    verdict = judge_head(fork.float_layers, parent.comparison, fork.comparison,
                                         _head_kind(built[id(parent)].built.layer_reports, fork.float_layers))
                    if branch:
                        summary.decode_head = verdict
                    else:
                        summary.head = verdict
                    break
        for track in tracks:
            if track.stage is None or id(track) not in built:
                continue
            candidate = next((f for f in tracks if f.fork_of is track and id(f) in built), None)
            judged = summary.decode_head if track.branch else summary.head
            chosen = candidate if candidate is not None and judged is not None and judged.loses else track
            self._stage_block(track, built[id(chosen)])

    def _stage_block(self, track: Track, build_: _Build) -> None:
        """Write a built block into `track`'s stage and add what it holds to `track.result`."""
        built, found, result = build_.built, build_.kernels, track.result
        assert track.stage is not None
        rules = rules_of(track.config.target)
        if rules.violation is not None and not track.config.smooth_only:
            broken = rules.violation(built.model.graph, opset_version(built.model.graph))
            if broken:
                raise AssertionError(f"internal error: --target {rules.target.value} wrote what {rules.runtime} "
                                     f"cannot import: {broken}")
            result.checked_nodes += rules.checked_nodes(built.model.graph) if rules.checked_nodes else 0
        result.layer_reports += built.layer_reports
        result.quantized_layers += len(built.quantized)
        result.sensitivity.update(built.sensitivity)
        result.rotation_errors.update(built.rotation_errors)
        result.worst_pair = max(result.worst_pair, worst_int16_pair_in_graph(built.model.graph))
        if found is not None and result.kernels is not None:
            result.kernels.add(found)
            result.kernels.blocks += 1
            result.kernels.checked_blocks += found.checked_blocks
        with self.progress.phase("write"):
            track.stage.add(built.model, self.shared, track.branch)

    def _keep(self, index: int, stats: ActivationStats) -> None:
        """Statistics of a block for later passes: in memory up to KEPT_STATS_BYTES in all, then on disk (rows of
        wide activations: 15 MB per Llama-2-7B MLP block)."""
        size = sum(a.nbytes for a in itertools.chain(stats.channel_max.values(), stats.rows.values(),
                                                     stats.hessians.values()))
        if self._kept_bytes + size <= KEPT_STATS_BYTES:
            self._kept_bytes += size
            self.stats[index] = stats
            return
        path = self.workdir / f"stats-{index}.npz"
        stats.save(path)
        self.stats[index] = path

    def _load(self, index: int) -> ActivationStats:
        kept = self.stats[index]
        return kept if isinstance(kept, ActivationStats) else ActivationStats.load(kept)

