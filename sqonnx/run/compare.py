"""`sqonnx compare FP.onnx QUANT.onnx`: what quantization cost, measured on the user's data in one run.

Both models run on the same samples: text tokenized with the FP model's tokenizer, or an .npz of feeds, read as
`--calib-data` reads them (calibrators.data: the same checks and one-line errors); by default held-out pydoc, which
no calibration reads. The quality numbers are the quality check's own (`streaming.runner.Comparison`, summed the
same way): for a language model (`logits` from `input_ids`) the perplexity of each and their ratio, the KL
divergence of the next-token distributions from the FP model's and the share of positions whose top-1 token
agrees; for any other model the cosine of their first outputs. Speed: the prefill of the first sample, the two
models alternating (median of `rounds`), and for a model with a key/value cache greedy decode after that prompt,
in tokens per second.

Models of up to WHOLE_MODEL_BYTES of weights together run as whole onnxruntime sessions. Bigger pairs run block by
block, as `quantize` runs them: the FP graph is cut along its residual stream (streaming.blocks.partition), the
quantized graph at the same borders (`follow`: the same value names), and each sample goes through FP block i then
quantized block i, the values crossing the borders carried (to disk beyond a budget), the FP model's output kept
until the quantized model's is compared with it (`run_track_block`, the quality check's own loop). Memory then
follows a block; the prefill time is the sum over blocks, and decode is not timed (a cache per block).
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from sqonnx.calibrators import CalibrationFeeds, calibration_feeds
from sqonnx.calibrators.carry import Carry
from sqonnx.calibrators.data import LOGITS, cache_outputs, pydoc_text, step_feeds
from sqonnx.config import DEFAULT_BLOCK_BYTES, CalibrationConfig
from sqonnx.errors import SqonnxError
from sqonnx.io.load import load_model
from sqonnx.passes.prepare import prepare
from sqonnx.runtime.session import Session, cpu_runs, open_file_session, open_session
from sqonnx.streaming.blocks import Block, Partition, follow, initializer_bytes, partition
from sqonnx.streaming.runner import (
    CARRY_MEMORY_BYTES,
    BlockRunner,
    Comparison,
    Run,
    Samples,
    Sequence,
    extract_block,
    reference_output,
    release_block,
    run_track_block,
)

HELD_OUT = "held-out pydoc"  # the default data's name in reports
# Pairs with more weights than this run block by block (a SmolLM2-135M pair, 0.8 GB, runs whole: decode is timed).
WHOLE_MODEL_BYTES = 2 << 30


@dataclass
class CompareReport:
    """Both models side by side on one set of samples (None: does not apply to this model)."""

    fp: str
    quantized: str
    data: str
    samples: int
    blocks: int  # 1: whole models; else the blocks each ran in
    language_model: bool
    tokens: int  # positions scored (language models)
    perplexity_fp: float | None
    perplexity: float | None
    kl: float | None  # mean KL(FP || quantized) per position, nats
    top1: float | None  # share of positions with the FP model's most likely next token
    cosine: float  # mean cosine of the first outputs, per sample
    prefill_fp_ms: float
    prefill_ms: float
    decode_fp_tokens_per_s: float | None
    decode_tokens_per_s: float | None

    @property
    def perplexity_change(self) -> float | None:
        if self.perplexity is None or self.perplexity_fp is None:
            return None
        return self.perplexity / self.perplexity_fp - 1

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "perplexity_change": self.perplexity_change,
                "prefill_speedup": self.prefill_fp_ms / self.prefill_ms if self.prefill_ms else None,
                "decode_speedup": (self.decode_tokens_per_s / self.decode_fp_tokens_per_s
                                   if self.decode_tokens_per_s and self.decode_fp_tokens_per_s else None)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def table(self) -> str:
        rows = [("", "FP", "quantized", "change")]
        if self.language_model and self.perplexity is not None and self.perplexity_fp is not None:
            change = self.perplexity_change or 0.0
            rows.append(("perplexity", f"{self.perplexity_fp:.3f}", f"{self.perplexity:.3f}", f"{100 * change:+.2f} %"))
            rows.append(("KL from FP (nats/token)", "", f"{self.kl:.4g}", ""))
            rows.append(("top-1 agreement", "", f"{100 * (self.top1 or 0):.1f} %", ""))
        rows.append(("cosine of outputs", "", f"{self.cosine:.4f}", ""))
        rows.append(("prefill (ms)", f"{self.prefill_fp_ms:.1f}", f"{self.prefill_ms:.1f}",
                     f"{self.prefill_fp_ms / self.prefill_ms:.2f}x" if self.prefill_ms else ""))
        if self.decode_fp_tokens_per_s and self.decode_tokens_per_s:
            rows.append(("decode (tokens/s)", f"{self.decode_fp_tokens_per_s:.1f}", f"{self.decode_tokens_per_s:.1f}",
                         f"{self.decode_tokens_per_s / self.decode_fp_tokens_per_s:.2f}x"))
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        lines = [f"{self.fp} vs {self.quantized} on {self.data} ({self.samples} samples"
                 + (f", {self.tokens} tokens scored" if self.language_model else "")
                 + (f"; block by block, {self.blocks} blocks)" if self.blocks > 1 else ")")]
        lines += ["  " + "  ".join(cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i])
                                   for i, cell in enumerate(row)).rstrip() for row in rows]
        return "\n".join(lines)


def compare_models(fp_path: Path, quantized_path: Path, data: Path | None = None, samples: int = 8,
                   seq_len: int = 512, rounds: int = 3, decode_tokens: int = 32,
                   block_bytes: int | None = None) -> CompareReport:
    """Run FP and quantized models side by side on `data` (None: held-out pydoc) and measure what changed.
    `block_bytes`: run block by block, blocks of at most this many bytes of FP weights; 0: whole models; None: whole
    models up to WHOLE_MODEL_BYTES together, else blocks of DEFAULT_BLOCK_BYTES."""
    if samples < 1 or seq_len < 2 or rounds < 1 or decode_tokens < 0 or (block_bytes or 0) < 0:
        raise SqonnxError("--samples and --rounds must be at least 1, --seq-len at least 2, --decode-tokens and "
                          "--block-size at least 0")
    if fp_path.resolve() == quantized_path.resolve():
        raise SqonnxError(f"both models are {fp_path}; give the FP model and its quantized output")
    # as quantize reads a model (constants lifted, every value typed): its blocks' borders, and any block a model
    fp_model, quantized_model = prepare(load_model(fp_path)), prepare(load_model(quantized_path))
    graph = fp_model.graph
    if [str(v.name) for v in graph.inputs] != [str(v.name) for v in quantized_model.graph.inputs] or \
            [str(v.name) for v in graph.outputs][:1] != [str(v.name) for v in quantized_model.graph.outputs][:1]:
        raise SqonnxError(f"the models differ in inputs ({sorted(str(v.name) for v in graph.inputs)} vs "
                          f"{sorted(str(v.name) for v in quantized_model.graph.inputs)}) or first output: compare a "
                          "model with its own quantized output")
    label = data.name if data is not None else HELD_OUT
    with tempfile.TemporaryDirectory(prefix="sqonnx-compare-") as scratch:
        if data is None:
            data = Path(scratch) / "held-out-pydoc.txt"
            data.write_text(pydoc_text("evaluation"))
        config = CalibrationConfig(data=data, num_samples=samples, seq_len=seq_len, own_text=0, decode_steps=0)
        feeds = calibration_feeds(graph, fp_path.parent, config)
        total = initializer_bytes(fp_model.graph.initializers.values()) + \
            initializer_bytes(quantized_model.graph.initializers.values())
        if block_bytes == 0 or (block_bytes is None and total <= WHOLE_MODEL_BYTES):
            present = cache_outputs(list(graph.inputs))
            del fp_model, quantized_model, graph  # the sessions read the files themselves
            return _whole(fp_path, quantized_path, label, list(feeds), rounds, decode_tokens, present)
        part = partition(graph, block_bytes or DEFAULT_BLOCK_BYTES)
        followed = follow(part, quantized_model.graph)
        if followed is None:
            raise SqonnxError("the quantized model cannot be cut where the FP model is (it lacks values the FP model's "
                              "blocks pass on, or has control flow such as --decode-weights' If): compare with "
                              "--block-size 0 for whole models")
        comparison, times = _by_blocks(fp_model, quantized_model, part, followed, feeds, Path(scratch))
    language = comparison.language_model and comparison.tokens > 0
    return _report(fp_path, quantized_path, label, feeds.count, len(part.blocks), comparison, language, times[0],
                   times[1], (None, None))


def _whole(fp_path: Path, quantized_path: Path, label: str, feeds: list[dict[str, np.ndarray]], rounds: int,
           decode_tokens: int, present: dict[str, str]) -> CompareReport:
    fp = open_file_session(fp_path, "the FP model")
    quantized = open_file_session(quantized_path, "the quantized model")
    name = fp.output_names[0]
    comparison = Comparison()
    for index, feed in enumerate(feeds):
        reference = fp.run([name], feed, f"sample {index}")[0]
        comparison.add(name, reference, quantized.run([name], feed, f"sample {index}")[0], feed)
    language = comparison.language_model and comparison.tokens > 0
    prefill_fp, prefill = _prefill_ms(fp, quantized, name, feeds[0], rounds)
    decode: tuple[float | None, float | None] = (None, None)
    if present and decode_tokens and LOGITS in fp.output_names and set(present.values()) <= set(fp.output_names):
        decode = _decode_rates(fp, quantized, feeds[0], present, decode_tokens)
    return _report(fp_path, quantized_path, label, len(feeds), 1, comparison, language, prefill_fp, prefill, decode)


def _report(fp_path: Path, quantized_path: Path, label: str, count: int, blocks: int, comparison: Comparison,
            language: bool, prefill_fp: float, prefill: float,
            decode: tuple[float | None, float | None]) -> CompareReport:
    return CompareReport(
        str(fp_path), str(quantized_path), label, count, blocks, language, comparison.tokens,
        float(np.exp(comparison.nll_reference / comparison.tokens)) if language else None,
        float(np.exp(comparison.nll / comparison.tokens)) if language else None,
        comparison.mean_kl if language else None, comparison.top1_agreement if language else None,
        float(np.mean(comparison.cosines)), prefill_fp, prefill, *decode)


def _by_blocks(fp: ir.Model, quantized: ir.Model, part: Partition, followed: Partition, feeds: CalibrationFeeds,
               scratch: Path) -> tuple[Comparison, tuple[float, float]]:
    """Every sample through FP block i, then quantized block i, for each i; the quantized model's first output
    compared with the FP model's where it is made. Returns the comparison and each model's time on sample 0 (ms)."""
    samples = Samples(feeds, 0, [])
    fp_runner, runner = BlockRunner(part, samples), BlockRunner(followed, samples)
    fp_carry = Carry(scratch / "fp", CARRY_MEMORY_BYTES // 2)
    carry = Carry(scratch / "quantized", CARRY_MEMORY_BYTES // 2)
    references = Carry(scratch / "references", CARRY_MEMORY_BYTES // 4)
    first = reference_output(part)
    comparison = Comparison()
    fp_timed: dict[str, float] = {}
    timed: dict[str, float] = {}
    keys = set(range(feeds.count))
    for fp_block, block in zip(part.blocks, followed.blocks, strict=True):
        fp_session = _block_session(fp, fp_block, "the FP model")
        produces = first in fp_block.outputs

        def run_fp(sequence: Sequence, run: Run, feeds: dict[str, np.ndarray], fetch: list[str],
                   session: Session = fp_session, produces: bool = produces) -> dict[str, np.ndarray]:
            fetch = [*fetch, first] if produces and first not in fetch else fetch
            start = time.perf_counter()
            results = dict(zip(fetch, session.run(fetch, feeds, f"sample {sequence.index}"), strict=True))
            if sequence.index == 0:
                fp_timed["seconds"] = fp_timed.get("seconds", 0.0) + time.perf_counter() - start
            if produces:
                references.put(run.key, first, results[first])
            return results

        fp_runner.forward(fp_block, run_fp, fp_carry)
        fp_runner.finish_block(fp_block, fp_carry)
        del fp_session, run_fp
        release_block(fp, fp_block)  # its memory-mapped weights leave resident memory
        session = _block_session(quantized, block, "the quantized model")
        run_track_block(runner, block, session, carry, keys, references, lambda _: comparison, timed)
        runner.finish_block(block, carry)
        del session
        release_block(quantized, block)
    return comparison, (1000 * fp_timed.get("seconds", 0.0), 1000 * timed.get("seconds", 0.0))


def _block_session(model: ir.Model, block: Block, what: str) -> Session:
    part = extract_block(model, block)
    return open_session(part, float32=not cpu_runs(part), what=f"{what}'s block {block.index} ({block.label})")


def _prefill_ms(fp: Session, quantized: Session, name: str, feed: dict[str, np.ndarray],
                rounds: int) -> tuple[float, float]:
    """Median prefill time of each model on `feed`, the two alternating after one warm-up run each."""
    times: dict[int, list[float]] = {0: [], 1: []}
    for round_ in range(rounds + 1):
        for index, session in enumerate((fp, quantized)):
            start = time.perf_counter()
            session.run([name], feed, "the speed run")
            if round_:
                times[index].append(1000 * (time.perf_counter() - start))
    return statistics.median(times[0]), statistics.median(times[1])


def _decode_rates(fp: Session, quantized: Session, prompt: dict[str, np.ndarray], present: dict[str, str],
                  steps: int) -> tuple[float, float]:
    """Greedy decode tokens per second of each model after `prompt`, through its key/value cache; the two
    alternate, best of two runs each."""
    best = [0.0, 0.0]
    for _ in range(2):
        for index, session in enumerate((fp, quantized)):
            fetch = [LOGITS, *present.values()]
            outputs = dict(zip(fetch, session.run(fetch, prompt, "the decode prompt"), strict=True))
            start = time.perf_counter()
            for step in range(steps):
                token = outputs[LOGITS][:, -1].argmax(axis=-1)
                feeds = {past: outputs[out] for past, out in present.items()} | step_feeds(prompt, token, step)
                outputs = dict(zip(fetch, session.run(fetch, feeds, f"decode step {step}"), strict=True))
            best[index] = max(best[index], steps / (time.perf_counter() - start))
    return best[0], best[1]
