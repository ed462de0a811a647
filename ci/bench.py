#!/usr/bin/env python
"""Side-by-side benchmark: FP32, onnxruntime's own quantizers and sqonnx on both real models (optimum exports).

Every number is a ratio measured in this one run (absolute times on shared machines are noise):
  quality   SmolLM2-135M perplexity on held-out pydoc text (16 x 512 tokens);
            all-MiniLM-L6-v2 mean cosine of sentence embeddings to FP32 (64 held-out paragraphs)
  prefill   FP32 latency / variant latency, batch 1, 512 tokens (median of alternating rounds)
  decode    variant tokens/s / FP32 tokens/s, 128 new tokens with the key/value cache (SmolLM2 only)
  size      output files in MB
  quantize  wall time and peak RSS of the quantization, each run in its own child process
Plus the profiler's kernel-time share per op type at 512 tokens (FP32, onnxruntime static, sqonnx O3).

SmolLM2 is the with-past export (one graph for prefill and decode; its cache inputs are empty at prefill).
Writes ci/results/bench.md and bench.json. `make bench` runs it with ci/genai_bench.py (about 45 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = ("FP32", "onnxruntime quantize_static", "onnxruntime quantize_dynamic", "onnxruntime MatMulNBits-int8",
            "onnxruntime MatMulNBits-int4", "sqonnx defaults", "sqonnx O1", "sqonnx O3", "sqonnx W8A8-GPTQ",
            "sqonnx W4A8", "sqonnx W4A8-nearest")
# The encoder has no decode: the weight-only and int4 rows are SmolLM2's.
MINILM_VARIANTS = ("FP32", "onnxruntime quantize_static", "onnxruntime quantize_dynamic",
                   "onnxruntime MatMulNBits-int8", "sqonnx defaults", "sqonnx O1", "sqonnx O3")
VARIANT_NOTES = {
    "onnxruntime quantize_static": "QDQ, per-tensor int8 weights and activations, min-max, no smoothing",
    "onnxruntime quantize_dynamic": "per-channel int8 weights, reduce_range, dynamic uint8 activations",
    "onnxruntime MatMulNBits-int8": "weight-only int8, blocks of 32, accuracy_level 4 (models/peers.py)",
    "onnxruntime MatMulNBits-int4": "int4 blocks of 32 rounded to nearest, accuracy_level 4 (int8 activations per "
                                    "block in the kernel: W4A8 without smoothing or GPTQ)",
    "sqonnx defaults": "alpha 0.5, rotation where exact, --level auto (O3, O1 where a static range cannot hold)",
    "sqonnx O1": "alpha 0.5, rotation where exact, per-token dynamic activations everywhere",
    "sqonnx O3": "alpha 0.5, rotation where exact, per-tensor static activations everywhere (--static)",
    "sqonnx W8A8-GPTQ": "the defaults with GPTQ weight rounding (--weight-rounding gptq)",
    "sqonnx W4A8": "--weights int4: MatMulNBits int4 blocks of 32, GPTQ, smoothing and rotation, accuracy_level 4",
    "sqonnx W4A8-nearest": "--weights int4 --weight-rounding nearest --allow-lossy: smoothing and rotation, no GPTQ",
}
SQONNX_OPTIONS: dict[str, dict[str, object]] = {
    "sqonnx defaults": {}, "sqonnx O1": {"level": "O1"}, "sqonnx O3": {"per_token_where_needed": False},
    "sqonnx W8A8-GPTQ": {"weight_rounding": "gptq"}, "sqonnx W4A8": {"weights": "int4"},
    "sqonnx W4A8-nearest": {"weights": "int4", "weight_rounding": "nearest", "allow_lossy": True}}


# ---------------------------------------------------------------- quantization, in a child process
def quantize_variant(variant: str, model: str, source: Path, output: Path, samples: int, seq_len: int) -> None:
    """Runs inside the child process that the parent measures."""
    import sqonnx
    from sqonnx.calibrators import calibration_feeds
    from sqonnx.io.load import load_model

    calibration = sqonnx.CalibrationConfig(num_samples=samples, seq_len=seq_len)
    if variant.startswith("sqonnx"):
        options = dict(SQONNX_OPTIONS[variant])
        if "level" in options:
            options["level"] = sqonnx.Level(options["level"])
        if "weights" in options:
            options["weights"] = sqonnx.Weights(options["weights"])
        if "weight_rounding" in options:
            options["weight_rounding"] = sqonnx.Rounding(options["weight_rounding"])
        config = sqonnx.QuantizeConfig(calibration=calibration, **options)  # type: ignore[arg-type]
        sqonnx.quantize(source, output, config)
        return
    if variant.startswith("onnxruntime MatMulNBits-int"):
        from models.peers import matmul_nbits

        matmul_nbits(source, output, int(variant[-1]))
        return
    from onnxruntime.quantization import CalibrationDataReader, QuantType, quantize_dynamic, quantize_static

    if variant == "onnxruntime quantize_dynamic":
        quantize_dynamic(source, output, per_channel=True, reduce_range=True, weight_type=QuantType.QInt8)
        return
    feeds = iter(calibration_feeds(load_model(source).graph, source.parent, calibration))

    class Reader(CalibrationDataReader):
        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(feeds, None)

    # Its calibrator keeps every intermediate output until merged: merge every few samples to bound memory
    # (it fails with "No data is collected" when the count divides the number of samples).
    merge_every = next(k for k in range(4, samples + 2) if samples % k)
    quantize_static(source, output, Reader(), extra_options={"CalibMaxIntermediateOutputs": merge_every})


def peak_rss_mb() -> float:
    """This process's own peak RSS (VmHWM). Not getrusage: on Linux a child's ru_maxrss starts from its
    parent's RSS at fork, and this benchmark's parent holds models of its own."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure_quantization(variant: str, model: str, source: Path, output: Path, samples: int,
                         seq_len: int) -> dict[str, float]:
    peak_file = output.with_suffix(".peak")
    args = [sys.executable, __file__, "--child", variant, model, str(source), str(output), str(samples), str(seq_len),
            str(peak_file)]
    start = time.perf_counter()
    if subprocess.run(args, cwd=Path(__file__).resolve().parent.parent).returncode != 0:
        raise SystemExit(f"quantization failed: {variant} on {model}")
    return {"quantize_s": time.perf_counter() - start, "peak_rss_mb": float(peak_file.read_text())}


# ---------------------------------------------------------------- measurements, in this process
def size_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.parent.glob(f"{path.name}*")) / 1e6


def alternating_ratio(measure: Callable[[Path], float], fp32: Path, variant: Path, rounds: int) -> float:
    """Median of measure(fp32) / measure(variant) over rounds taken in alternation (load hits both alike)."""
    ratios = [measure(fp32) / measure(variant) for _ in range(rounds)]
    return float(np.median(ratios))


def bench_smollm2(work: Path, samples: int, rounds: int, variants: tuple[str, ...]) -> list[dict[str, object]]:
    from models import smollm2
    from models.evaluate import decode_seconds, eval_windows, latency, perplexity

    fp32 = smollm2.build(with_past=True)
    windows = eval_windows(fp32.parent, 512, 16)
    prompt = windows[0][:32]
    rows = []
    for variant in variants:
        path = fp32 if variant == "FP32" else work / f"smollm2-{variant.split()[-1]}.onnx"
        row: dict[str, object] = {"model": "SmolLM2-135M", "variant": variant}
        if variant != "FP32":
            row.update(measure_quantization(variant, "smollm2", fp32, path, samples, 512))
        row["perplexity"] = perplexity(path, windows)
        if variant != "FP32":
            row["prefill_speedup"] = alternating_ratio(lambda p: latency(p, 512), fp32, path, rounds)
            row["decode_speedup"] = alternating_ratio(lambda p: decode_seconds(p, prompt, 128), fp32, path, rounds)
        row["size_mb"] = size_mb(path)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def bench_minilm(work: Path, samples: int, rounds: int) -> list[dict[str, object]]:
    from models import minilm
    from models.evaluate import latency, mean_cosine, sentence_embeddings, sentences

    fp32 = minilm.build()
    texts = sentences(fp32.parent, 64)
    reference = sentence_embeddings(fp32, texts)
    rows = []
    for variant in MINILM_VARIANTS:
        path = fp32 if variant == "FP32" else work / f"minilm-{variant.split()[-1]}.onnx"
        row: dict[str, object] = {"model": "all-MiniLM-L6-v2", "variant": variant}
        if variant != "FP32":
            row.update(measure_quantization(variant, "minilm", fp32, path, samples, 128))
        row["cosine"] = mean_cosine(sentence_embeddings(path, texts), reference)
        if variant != "FP32":
            row["prefill_speedup"] = alternating_ratio(lambda p: latency(p, 512), fp32, path, rounds)
        row["size_mb"] = size_mb(path)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def profiles(work: Path) -> dict[str, dict[str, float]]:
    from models import smollm2
    from models.evaluate import kernel_time_by_op

    fp32 = smollm2.build(with_past=True)
    return {name: kernel_time_by_op(path, 512) for name, path in (
        ("FP32", fp32), ("onnxruntime quantize_static", work / "smollm2-quantize_static.onnx"),
        ("sqonnx defaults", work / "smollm2-defaults.onnx"), ("sqonnx O3", work / "smollm2-O3.onnx"))}


# ---------------------------------------------------------------- report
def table(rows: list[dict[str, object]], fp32_size: dict[str, float]) -> str:
    def fmt(value: object, spec: str, suffix: str = "") -> str:
        return "" if value is None else f"{value:{spec}}{suffix}"

    lines = ["| model | variant | quality | prefill speed-up | decode speed-up | size MB | quantize s | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        quality = (f"ppl {r['perplexity']:.2f}" if "perplexity" in r else f"cos {r['cosine']:.4f}")
        rss = r.get("peak_rss_mb")
        rss_text = "" if rss is None else f"{rss:.0f} ({float(rss) / fp32_size[str(r['model'])]:.1f}x)"  # type: ignore[arg-type]
        lines.append(f"| {r['model']} | {r['variant']} | {quality} | {fmt(r.get('prefill_speedup'), '.2f', 'x')} | "
                     f"{fmt(r.get('decode_speedup'), '.2f', 'x')} | {fmt(r.get('size_mb'), '.0f')} | "
                     f"{fmt(r.get('quantize_s'), '.0f')} | {rss_text} |")
    return "\n".join(lines)


def profile_table(shares: dict[str, dict[str, float]], top: int = 8) -> str:
    ops: list[str] = []
    for share in shares.values():
        ops += [op for op in list(share)[:top] if op not in ops]
    lines = ["| op type | " + " | ".join(shares) + " |", "|---" * (len(shares) + 1) + "|"]
    for op in ops:
        lines.append(f"| {op} | " + " | ".join(f"{s.get(op, 0.0) * 100:.1f} %" for s in shares.values()) + " |")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        variant, model, source, output, samples, seq_len, peak_file = sys.argv[2:9]
        quantize_variant(variant, model, Path(source), Path(output), int(samples), int(seq_len))
        Path(peak_file).write_text(str(peak_rss_mb()))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-samples", type=int, default=128, help="calibration samples for every quantizer")
    parser.add_argument("--rounds", type=int, default=3, help="alternating timing rounds per ratio")
    parser.add_argument("--models", default="smollm2,minilm")
    parser.add_argument("--variants", default=",".join(VARIANTS[1:]),
                        help="SmolLM2 rows besides FP32 (always measured: every number is a ratio to it)")
    parser.add_argument("--output", default="bench", help="results file stem in ci/results")
    args = parser.parse_args()
    chosen = ("FP32", *(v for v in VARIANTS[1:] if v in args.variants.split(",")))
    from models import minilm, smollm2

    work = Path(tempfile.mkdtemp(prefix="sqonnx-bench-"))
    try:
        rows: list[dict[str, object]] = []
        shares: dict[str, dict[str, float]] = {}
        if "smollm2" in args.models:
            rows += bench_smollm2(work, args.num_samples, args.rounds, chosen)
            shares = profiles(work) if {"sqonnx O3", "onnxruntime quantize_static"} <= set(chosen) else {}
        if "minilm" in args.models:
            rows += bench_minilm(work, args.num_samples, args.rounds)
        fp32_size = {"SmolLM2-135M": size_mb(smollm2.build(with_past=True)),
                     "all-MiniLM-L6-v2": size_mb(minilm.build())}
        text = [f"Calibration: {args.num_samples} pydoc samples for every quantizer; "
                f"CPU threads: onnxruntime default; rounds: {args.rounds}.", "", table(rows, fp32_size), ""]
        text += [f"- {name}: {note}" for name, note in VARIANT_NOTES.items()
                 if name in chosen or ("minilm" in args.models and name in MINILM_VARIANTS)]
        if shares:
            text += ["", "Kernel time by op type, SmolLM2 prefill of 512 tokens (onnxruntime profiler):", "",
                     profile_table(shares)]
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"{args.output}.json").write_text(json.dumps({"rows": rows, "profiles": shares,
                                                        "num_samples": args.num_samples}, indent=2))
        (RESULTS / f"{args.output}.md").write_text("\n".join(text) + "\n")
        print("\n".join(text))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
