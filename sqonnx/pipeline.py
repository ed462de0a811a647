"""The passes over the blocks of a model that quantize it: calibrate, smooth and quantize, judge, write.

The first pass calibrates every block on every sample and writes the requested build. `--alpha auto` judges
its candidates (per-group α and single α values) on held-back samples as extra tracks of that pass, and
rewrites the output if a single α wins; `--keep-float-budget` runs a pass per trial (statistics reused, no
calibration), then rewrites the output with the chosen float layers. Each block is freed before the next
one is read, so memory follows the largest block.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import onnx_ir as ir

from sqonnx import tensorrt
from sqonnx.blocks import Block, Partition
from sqonnx.build import W4A8, Built, RotationJudge, build
from sqonnx.calibrators.cache import CalibrationCache
from sqonnx.calibrators.carry import Carry
from sqonnx.calibrators.channel_max import ActivationStats
from sqonnx.calibrators.data import LOGITS
from sqonnx.config import QuantizeConfig, Rounding, Weights
from sqonnx.errors import SqonnxError
from sqonnx.graph import find_linear_layers, opset_version, output_layer, prefetch
from sqonnx.kernels import KernelCheck, count_kernels
from sqonnx.output import StreamingWriter, no_space
from sqonnx.passes.smoothing_groups import find_smoothing_groups, statistics_needed
from sqonnx.passes.transposed import FOLDED_TENSOR
from sqonnx.pause import pause_point
from sqonnx.progress import Progress, free_memory
from sqonnx.quality import HeadVerdict, QualityCheck, loss_noise
from sqonnx.report import LayerReport
from sqonnx.session import PREPACK_TOKENS, cpu_runs, open_session
from sqonnx.streaming import (
    CARRY_MEMORY_BYTES,
    BlockRunner,
    Comparison,
    Samples,
    block_initializers,
    calibrate_block,
    extract_block,
    forward_block,
    release_block,
    run_track_block,
    time_fp_block,
)
from sqonnx.target import Target, worst_int16_pair_in_graph

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
class Track:
    """One way of building the INT8 model, judged on evaluation samples (`keys`) against the FP model."""

    name: str
    config: QuantizeConfig
    float_layers: frozenset[str] = frozenset()
    keys: set[int] = field(default_factory=set)
    comparison: Comparison = field(default_factory=Comparison)
    timed: dict[str, float] = field(default_factory=dict)
    # Built only from the first block where it differs (its float layers) on, from `fork_of`'s carried values
    # there: judging the LM head float costs one build of the last block, not of every block.
    fork_of: Track | None = None


@dataclass
class BlockPassResult:
    layer_reports: list[LayerReport] = field(default_factory=list)
    quantized_layers: int = 0
    sensitivity: dict[str, float] = field(default_factory=dict)
    kernels: KernelCheck | None = None
    worst_pair: int = 0
    fp_seconds: float = 0.0
    resumed: int = 0  # blocks whose calibration an earlier run left in --cache-dir
    checked: dict[tuple[object, ...], KernelCheck] = field(default_factory=dict)  # kernels per block pattern
    rotation_errors: dict[str, tuple[float, float]] = field(default_factory=dict)  # see build.Built
    head: HeadVerdict | None = None  # the quantized LM head judged against a float one, where the block was written
    tensorrt_qdq: int = 0  # --target tensorrt: Q/DQ nodes written, each checked against TensorRT's rules


@dataclass
class KeepFloatTrial:
    float_layers: list[str]
    quality_loss: float
    speedup: float  # FP time / this model's time, one forward of the first evaluation sample (block by block)


@dataclass
class Outcome:
    """What the passes chose and wrote."""

    config: QuantizeConfig
    result: BlockPassResult
    alpha_trials: dict[str, float] = field(default_factory=dict)
    keep_float: list[KeepFloatTrial] = field(default_factory=list)
    resumed: int = 0  # blocks whose calibration an earlier run left in --cache-dir
    check: QualityCheck | None = None  # the written model against the FP model (None: --check-samples 0)
    head: HeadVerdict | None = None  # the INT8 LM head judged against a float one (None: not judged)


def _check(written: Track, baseline: Track | None, held_out: bool) -> QualityCheck | None:
    comparison = written.comparison
    if not comparison.cosines:
        return None
    measured = baseline is not None and bool(baseline.comparison.cosines)
    # paired where both ran the same samples (in order: BlockRunner.forward); --keep-float-budget's trials ran others
    noise = loss_noise(comparison.sample_losses, baseline.comparison.sample_losses,
                       written.keys == baseline.keys) if measured and baseline else None
    return QualityCheck(len(comparison.cosines), held_out, comparison.language_model and comparison.tokens > 0,
                        comparison.quality_loss, comparison.output_error,
                        baseline.comparison.quality_loss if measured and baseline else None,
                        baseline.comparison.output_error if measured and baseline else None,
                        baseline.name if baseline else baseline_name(written.config), comparison.mean_kl, noise)


def baseline_name(config: QuantizeConfig) -> str:
    return "unsmoothed W4A8 (round to nearest)" if config.weights is Weights.INT4 else "unsmoothed W8A8"


def _head_kind(reports: list[LayerReport], head: frozenset[str]) -> str:
    """How the LM head is quantized in a build: W4A8 or INT8."""
    return next((W4A8 for r in reports if r.name in head and r.level == W4A8), "INT8")


def _signature(model: ir.Model) -> tuple[object, ...]:
    """What onnxruntime's fusions of a quantized block depend on: its ops in order, with the types of their
    inputs (names and weights aside)."""
    return tuple((node.op_type, node.domain, tuple(None if v is None else v.dtype for v in node.inputs),
                  tuple(sorted((k, str(a.value)) for k, a in node.attributes.items()
                               if a.type != ir.AttributeType.TENSOR)))
                 for node in model.graph)


class Pipeline:
    def __init__(self, model: ir.Model, part: Partition, samples: Samples, quantized: set[str], workdir: Path,
                 progress: Progress, verify: bool, cache: CalibrationCache | None = None,
                 rotation: RotationJudge | None = None) -> None:
        self.model, self.part, self.samples = model, part, samples
        self.rotation = rotation
        self.quantized = quantized
        self.providers: list[str | tuple[str, dict[str, str]]] | None = None  # calibration's (None: the CPU)
        self.workdir = workdir
        self.progress = progress
        self.verify = verify
        self.runner = BlockRunner(part, samples)
        self.fp_carry = Carry(workdir / "carry", CARRY_MEMORY_BYTES)
        # --sequential: the counted samples' values as the INT8 blocks before computed them
        self.stream = Carry(workdir / "stream", CARRY_MEMORY_BYTES)
        self.sequential = False
        # the FP outputs the quality check and the searches compare with: logits are large (SmolLM2: 100 MB a
        # sample) and read once per track, so they wait on disk
        self.references = Carry(workdir / "references", REFERENCE_MEMORY_BYTES)
        self.stats: dict[int, Path | ActivationStats] = {}
        self.shared = {id(v.const_value) for v in model.graph.initializers.values()}
        self.cache = cache
        self._kept_bytes = 0
        first = part.graph_outputs[0] if part.graph_outputs else ""
        # the block before the one that makes the model's first output: where a run that compares outputs
        # with the FP model's resumes from --cache-dir
        self.before_output = next((b.index for b in part.blocks if first in b.outputs), 0) - 1

    def quantize(self, config: QuantizeConfig, writer: StreamingWriter) -> Outcome:
        samples = self.samples
        search = bool(samples.held_out) and config.alpha_auto and config.smooth and not config.smooth_only
        primary = Track("per group" if config.alpha_auto else "requested", config,
                        keys=set(samples.held_out_keys if search else samples.check_keys))
        tracks = [primary]
        if search:
            low, high = config.alpha_range
            tracks += [Track(str(alpha), replace(config, alpha=alpha), keys=set(samples.held_out_keys))
                       for alpha in UNIFORM_ALPHAS if low <= alpha <= high]
        keep_float = config.keep_float_budget is not None
        eval_keys = set(range(min(EVAL_SAMPLES, samples.calibration_count))) if keep_float else set()
        trial0 = primary
        if keep_float and primary.keys:
            trial0 = Track("keep-float 0", config, keys=eval_keys)
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
                weight_rounding=Rounding.NEAREST), keys=set(primary.keys))
            tracks.append(baseline)
        # a language model's LM head (the layer computing `logits`) float beside the INT8 one: INT8 only where it pays
        head = output_layer(self.model.graph) if self.part.graph_outputs[:1] == [LOGITS] else None
        head_track = None
        if head is not None and head.name in self.quantized and len(self.quantized) > 1 and primary.keys \
                and not keep_float and not config.smooth_only:
            head_track = Track("float LM head", config, frozenset({head.name}), keys=set(primary.keys),
                               fork_of=primary)
            tracks.append(head_track)
        references = set().union(*(t.keys for t in tracks))
        result = self.run_pass("quantizing", tracks, primary, writer, calibrate=True, references=references,
                               keep_stats=keep_float or search, timing_key=min(eval_keys) if keep_float else None)
        outcome = Outcome(config, result, resumed=result.resumed)
        written = primary
        head_float: frozenset[str] = frozenset()
        if head_track is not None and result.head is not None:
            outcome.head = result.head
            logger.info("LM head: %s", outcome.head.summary())
            if outcome.head.loses:
                head_float = head_track.float_layers
                written = head_track  # run_pass wrote its last block (sqonnx.pipeline.Pipeline._write)
        if search:
            judged = [t for t in tracks if t is not baseline and t is not head_track
                      and (t is not trial0 or t is primary)]
            outcome.alpha_trials = {t.name: t.comparison.output_error for t in judged}
            best = min(judged, key=lambda t: t.comparison.output_error)
            logger.info("--alpha auto: %s", ", ".join(f"{k} {v:.4f}" for k, v in outcome.alpha_trials.items()))
            if best is not primary:
                outcome.config = best.config
                written = best
                writer.restart()
                if head_float:  # the head as judged, the check measuring the model written
                    written = Track(best.name, best.config, head_float, keys=set(best.keys))
                    outcome.result = self.run_pass("writing", [written], written, writer)
                else:
                    outcome.result = self.run_pass("writing", [], Track(best.name, best.config), writer)
        if keep_float:
            written = self._keep_float(outcome, trial0, result, eval_keys, writer)
        outcome.check = _check(written, baseline, samples.held_out > 0 and written.keys <= set(samples.held_out_keys))
        return outcome

    def _keep_float(self, outcome: Outcome, trial0: Track, first: BlockPassResult, eval_keys: set[int],
                    writer: StreamingWriter) -> Track:
        """Leave the most sensitive layers in float, 1, 2, 4, ... until the quality loss fits the budget. Returns
        the last trial: the model written, its comparison measured on `eval_keys`."""
        config = outcome.config
        budget = config.keep_float_budget
        assert budget is not None
        ranking = sorted(first.sensitivity, key=lambda name: -first.sensitivity[name])
        fp_seconds = first.fp_seconds
        trial = trial0 if config is trial0.config else None
        count = 0
        while True:
            chosen = frozenset(ranking[:count])
            if trial is None:
                trial = Track(f"keep-float {count}", config, chosen, keys=eval_keys)
                self.run_pass(f"keep-float trial {count}", [trial], None, None)
            loss = trial.comparison.quality_loss
            speed = fp_seconds / trial.timed["seconds"] if trial.timed.get("seconds") else 0.0
            outcome.keep_float.append(KeepFloatTrial(list(ranking[:count]), loss, speed))
            logger.info("keep-float: %d layers in float -> quality loss %.4f", count, loss)
            if loss <= budget or count >= len(ranking) // 2:
                break
            count = 1 if count == 0 else 2 * count
            trial = None
        if outcome.keep_float[-1].quality_loss > budget:
            logger.warning("--keep-float-budget %.3g not met with %d of %d layers in float (loss %.4f); keeping those",
                           budget, count, len(ranking), outcome.keep_float[-1].quality_loss)
        if chosen:
            writer.restart()
            outcome.result = self.run_pass("writing", [], Track("chosen", config, chosen), writer)
        assert trial is not None
        return trial

    def run_pass(self, label: str, tracks: list[Track], write: Track | None, writer: StreamingWriter | None, *,
                 calibrate: bool = False, references: set[int] | frozenset[int] = frozenset(),
                 keep_stats: bool = False, timing_key: int | None = None) -> BlockPassResult:
        """One pass over the blocks: calibrate (first pass), build and judge each track, write `write`."""
        result = BlockPassResult(kernels=KernelCheck() if self.verify and write is not None else None)
        builds = [*tracks, *([write] if write is not None and write not in tracks else [])]
        carries = {id(t): Carry(self.workdir / f"track-{n}", CARRY_MEMORY_BYTES) for n, t in enumerate(builds)}
        progress = self.progress
        progress.start_pass(label, self.part.blocks)
        self.sequential = calibrate and write is not None and write.config.sequential
        resume = self._resume_point(references) if calibrate else -1
        forked: set[int] = set()
        candidates: dict[int, tuple[Built, KernelCheck | None, tuple[object, ...]]] = {}
        if calibrate:
            result.resumed = resume + 1
        for block in self.part.blocks:
            runs = self.samples.total_runs if calibrate and block.index > resume else sum(len(t.keys) for t in builds)
            if block.index + 1 < len(self.part.blocks):
                prefetch(block_initializers(self.part.blocks[block.index + 1]))
            with progress.block(block, runs):
                with progress.phase("read and rotate"):
                    fp = extract_block(self.model, block)
                here = {layer.name for layer in find_linear_layers(fp.graph)} & self.quantized
                if calibrate and block.index > resume:
                    stats = self._calibrate(block, fp, builds[0].config, references)
                    if keep_stats:
                        self._keep(block.index, stats)
                    if self.cache is not None:
                        self.cache.save_stats(block.index, stats)
                    if timing_key is not None:
                        timed: dict[str, float] = {}
                        with progress.phase("calibrate"):
                            time_fp_block(self.runner, block, fp, self.fp_carry, timing_key, timed)
                        result.fp_seconds += timed.get("seconds", 0.0)
                elif calibrate:
                    assert self.cache is not None
                    stats = self.cache.stats(block.index) or ActivationStats({})
                    result.fp_seconds = float("nan")  # resumed: the FP model's own time is not measured
                    if keep_stats:
                        self._keep(block.index, stats)
                else:
                    stats = self._load(block.index)
                for number, track in enumerate(builds):
                    if track.fork_of is not None and id(track) not in forked:
                        if not track.float_layers & here:
                            continue  # built as the track it forks from: its values are that track's
                        carries[id(track)].copy_from(carries[id(track.fork_of)])
                        forked.add(id(track))
                    last = number == len(builds) - 1
                    candidate = track is write or (write is not None and track.fork_of is write)
                    built = self._build_track(block, fp if last else fp.clone(), stats, here, track, candidate,
                                              carries[id(track)], writer, result, calibrate and write is track)
                    if candidate:
                        candidates[id(track)] = built
                if write is not None:
                    self._write(block, write, builds, candidates, writer, result)
                    candidates.clear()
                self.runner.finish_block(block, self.fp_carry)
                self.runner.finish_block(block, self.stream)
                if self.cache is not None and calibrate and block.index > resume and self._resumable(references):
                    with progress.phase("cache"):
                        self.cache.save_carry(block.index, self._calibration_carry, keep=self.before_output)
                    pause_point(f"block-{block.index}")
                for carry in carries.values():
                    self.runner.finish_block(block, carry)
                del fp
                release_block(self.model, block)
                free_memory()
        if self.cache is not None and calibrate and references and self._resumable(references):
            self.cache.save_references(self.references)
        for carry in carries.values():
            carry.clear()
        return result

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

    def _resume_point(self, references: set[int] | frozenset[int]) -> int:
        """The last block calibrated by an earlier run of the same key (--cache-dir), -1 when none; not past the
        block before the one that makes the model's first output when this run compares outputs with the FP
        model's (those are not kept)."""
        if self.cache is None:
            return -1
        if not self._resumable(references):
            return -1
        # the FP outputs compared with are kept too: without them a run resumes before the block that makes them
        kept = bool(references) and set(references) <= self.cache.references()
        resume = self.cache.resume_after(len(self.part.blocks),
                                         self.before_output if references and not kept else None)
        if resume >= 0:
            self.cache.load_carry(resume, self._calibration_carry)
            if kept:
                self.cache.load_references(self.references)
            logger.info("--cache-dir: blocks 1-%d calibrated by an earlier run", resume + 1)
        return resume

    @property
    def _calibration_carry(self) -> Carry:
        """Where the counted samples' values are carried: the INT8 stream with --sequential, else the FP one."""
        return self.stream if self.sequential else self.fp_carry

    def _resumable(self, references: set[int] | frozenset[int]) -> bool:
        """--sequential keeps two streams (INT8 for calibration, FP for the outputs compared with): a run that
        compares outputs calibrates from the start."""
        return not (self.sequential and references)

    def _calibrate(self, block: Block, fp: ir.Model, config: QuantizeConfig,
                   references: set[int] | frozenset[int], rows: bool = False) -> ActivationStats:
        """Statistics of every group of the block (excluded layers too: a cached block then serves any later
        --exclude), with rows whenever a choice may need them, they are cached, or `rows`."""
        with self.progress.phase("calibrate"):
            every = {layer.name for layer in find_linear_layers(fp.graph)}
            request = statistics_needed(find_smoothing_groups(fp.graph), every)
            keep_rows = KEPT_ROWS if rows or config.needs_rows or self.cache is not None else 0
            return calibrate_block(self.runner, block, fp, request.channel_max, request.probes, keep_rows,
                                   self.fp_carry, set(references), self.references, self.progress.tick,
                                   self.stream if self.sequential else None, gram=config.needs_hessians,
                                   providers=self.providers)

    def _build_track(self, block: Block, fp: ir.Model, stats: ActivationStats, here: set[str], track: Track,
                     candidate: bool, carry: Carry, writer: StreamingWriter | None, result: BlockPassResult,
                     calibrating: bool = False) -> tuple[Built, KernelCheck | None, tuple[object, ...]]:
        """Build `track`'s block and run its samples. A `candidate` for writing (the written track, or a track that
        forks from it) also gets its kernels checked; the block's graph, its kernels and its pattern are returned."""
        with self.progress.phase("smooth and quantize"):
            built = build(fp, track.config, stats, here - track.float_layers,
                          sensitivities=candidate and track.config.keep_float_budget is not None,
                          rotation=self.rotation if candidate else None)
        for value in built.model.graph.initializers.values():
            value.meta.pop(FOLDED_TENSOR, None)  # the materialized table copy: not to be kept with the written graph
        check = candidate and result.kernels is not None and bool(built.plan) and not track.config.smooth_only
        signature = _signature(built.model) if check else ()
        found = None
        if check and signature in result.checked:
            # onnxruntime's fusions depend on the graph's pattern only: a block with the very ops and levels of a
            # block already checked runs the same kernels (a 7B model has 64 alike), and its check is skipped
            repeated = result.checked[signature]
            found = replace(repeated, unfused=[f"{name} (and alike in block {block.index})"
                                               for name in repeated.unfused], checked_blocks=0)
            check = False
        # --sequential: the next block is calibrated on what this INT8 block computes from the INT8 blocks before
        sequential = calibrating and track.config.sequential and bool(built.plan)
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
                    result.checked[signature] = found
                if track.keys:
                    run_track_block(self.runner, block, session, carry, track.keys, self.references,
                                    track.comparison, track.timed)
                if sequential:
                    forward_block(self.runner, block, session, self.stream, self.samples.counted_keys,
                                  self.progress.tick)
                del session
        return built, found, signature

    def _write(self, block: Block, write: Track, builds: list[Track], candidates: dict[int, tuple[Built,
               KernelCheck | None, tuple[object, ...]]], writer: StreamingWriter | None,
               result: BlockPassResult) -> None:
        """Write the block as `write` built it, or as a track forking from it built it where that wins (the LM head
        float, judged once both have run the check's samples through the block that makes the first output)."""
        chosen = write
        for track in builds:
            if id(track) in candidates and track.fork_of is write and id(write) in candidates and \
                    track.comparison.cosines:
                result.head = HeadVerdict(track.float_layers, write.comparison.quality_loss,
                                          track.comparison.quality_loss, track.comparison.language_model,
                                          _head_kind(candidates[id(write)][0].layer_reports, track.float_layers))
                if result.head.loses:
                    chosen = track
        if id(chosen) not in candidates:
            return
        built, found, _ = candidates[id(chosen)]
        if chosen.config.target is Target.TENSORRT and not chosen.config.smooth_only:
            broken = tensorrt.violation(built.model.graph, opset_version(built.model.graph))
            if broken:
                raise AssertionError(f"internal error: --target tensorrt wrote what TensorRT cannot import: {broken}")
            result.tensorrt_qdq += tensorrt.count_qdq(built.model.graph)
        result.layer_reports += built.layer_reports
        result.quantized_layers += len(built.plan)
        result.sensitivity.update(built.sensitivity)
        result.rotation_errors.update(built.rotation_errors)
        result.worst_pair = max(result.worst_pair, worst_int16_pair_in_graph(built.model.graph))
        if found is not None and result.kernels is not None:
            result.kernels.add(found)
            result.kernels.blocks += 1
            result.kernels.checked_blocks += found.checked_blocks
        if writer is not None:
            with self.progress.phase("write"):
                writer.add(built.model, self.shared)

    def _keep(self, index: int, stats: ActivationStats) -> None:
        """Statistics of a block for later passes: in memory up to KEPT_STATS_BYTES in all, then on disk (rows of
        wide activations: 15 MB per Llama-2-7B MLP block)."""
        size = sum(a.nbytes for a in itertools.chain(stats.channel_max.values(), stats.rows.values()))
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

