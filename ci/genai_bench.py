#!/usr/bin/env python
"""Where LLMs run: SmolLM2-135M as onnxruntime-genai's model builder writes it, in genai's own generator.

Side by side in one run (every speed a ratio to FP32 measured in alternating rounds, each generation in a
fresh child process of the builder's environment, ci/genai_generate.py):
  builder FP32;
  onnxruntime's MatMulNBits weight-only int4 and int8 (block 32, symmetric, accuracy_level 4: int8 compute,
  LM head included), the peers a genai user reaches for;
  sqonnx: the defaults (portable 7-bit weights), the defaults with 8-bit weights for VNNI/ARM targets, O1
  everywhere, O3 everywhere (--static), W4A8 (--weights int4), and W8A8 prompt with W4A8 decode in one graph
  (--decode-weights int4).
Columns: held-out perplexity (16 x 512 tokens, onnxruntime), the same staged as generation runs (8 windows:
256 tokens as the prompt, then one token at a time through the cache, teacher-forced), prefill of a 256-token
prompt and decode tokens/s over 128 greedy tokens in the generator, greedy agreement with FP32 over those 128 tokens
(identical share, first divergence), file size, the generator process's peak RSS.
Also the profiler's kernel-time table at one decode token (past 256) for FP32, MatMulNBits int4 and int8,
the sqonnx defaults and W4A8. Writes ci/results/genai_bench.md and genai_bench.json (part of `make bench`).

    .venv/bin/python ci/genai_bench.py [--rounds 3] [--samples 128] [--only 'VARIANT|VARIANT']
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

import sqonnx  # noqa: E402
from ci.generation import VNNI, decode_profile_table  # noqa: E402
from models import genai_smollm2  # noqa: E402
from models.evaluate import (  # noqa: E402
    decode_kernel_time_by_op,
    eval_windows,
    greedy_agreement,
    perplexity,
    staged_perplexity,
)
from models.peers import matmul_nbits  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PROMPT_TOKENS, NEW_TOKENS = 256, 128
STAGED_WINDOWS = 8  # each 256 single-token runs
SQONNX_VARIANTS: dict[str, dict] = {
    "sqonnx defaults (--level auto, portable 7-bit weights)": {},
    "sqonnx defaults, --target x86-vnni (8-bit weights)": VNNI,
    "sqonnx O1 --target x86-vnni": {"level": sqonnx.Level.O1, **VNNI},
    "sqonnx O3 --static": {"per_token_where_needed": False},
    "sqonnx --weights int4 (W4A8)": {"weights": sqonnx.Weights.INT4},
    "sqonnx --decode-weights int4 (W8A8 prompt, W4A8 decode, one graph)": {"decode_weights": sqonnx.Weights.INT4},
    "sqonnx --decode-weights int8-blocks (W8A8 prompt, 8-bit MatMulNBits decode)": {
        "decode_weights": sqonnx.Weights.INT8_BLOCKS},
}
NBITS = {"MatMulNBits int4 (weight-only, block 32)": 4, "MatMulNBits int8 (weight-only, block 32)": 8}


def nbits_folder(source: Path, folder: Path, bits: int) -> None:
    """MatMulNBits of the builder's graph in a genai folder of its own (config and tokenizer copied)."""
    matmul_nbits(source, folder / "model.onnx", bits)
    for companion in source.parent.iterdir():
        if companion.is_file() and not companion.name.startswith("model.onnx"):
            shutil.copy(companion, folder / companion.name)


def generate(python: Path, folder: Path, prompt_file: Path) -> dict:
    script = Path(__file__).with_name("genai_generate.py")
    done = subprocess.run([str(python), str(script), str(folder), str(prompt_file), str(NEW_TOKENS)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"generation failed in {folder}:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def size_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.glob("*.onnx*")) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--samples", type=int, default=128, help="calibration samples for sqonnx")
    parser.add_argument("--only", default="", help="'|'-separated variants to run beside builder FP32 (default: all); "
                                                   "writes genai_bench-only.md/json, not the full table")
    args = parser.parse_args()
    only = set(filter(None, args.only.split("|")))
    unknown = only - set(NBITS) - set(SQONNX_VARIANTS)
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}; choose from {[*NBITS, *SQONNX_VARIANTS]}")
    fp32 = genai_smollm2.build()
    python = genai_smollm2.genai_python()
    windows = eval_windows(fp32.parent, 512, 16)
    with tempfile.TemporaryDirectory(prefix="sqonnx-genai-bench-") as tmp:
        work = Path(tmp)
        prompt_file = work / "prompt.json"
        prompt_file.write_text(json.dumps([int(t) for t in eval_windows(fp32.parent, PROMPT_TOKENS, 1)[0]]))
        folders: dict[str, Path] = {"builder FP32": fp32.parent}
        notes: dict[str, str] = {}
        for index, (name, bits) in enumerate(NBITS.items()):
            if only and name not in only:
                continue
            folder = work / f"nbits{index}"
            folder.mkdir()
            nbits_folder(fp32, folder, bits)
            folders[name] = folder
        for index, (name, options) in enumerate(SQONNX_VARIANTS.items()):
            if only and name not in only:
                continue
            folder = work / f"sqonnx{index}"
            folder.mkdir()
            config = sqonnx.QuantizeConfig(calibration=sqonnx.CalibrationConfig(num_samples=args.samples), **options)
            start = time.perf_counter()
            report = sqonnx.quantize(fp32, folder / "model.onnx", config)
            notes[name] = (f"{sum(r.level == 'O1' for r in report.quantized_layers)} of {len(report.quantized_layers)} "
                           f"layers per-token; rotation: {report.settings['rotation']}; "
                           f"quantized in {time.perf_counter() - start:.0f} s")
            print(name, notes[name], flush=True)
            folders[name] = folder

        rows = {name: {"variant": name, "size_mb": size_mb(folder),
                       "perplexity": perplexity(folder / "model.onnx", windows),
                       # as generation runs: half of each window as the prompt, then one token at a time
                       "staged_perplexity": staged_perplexity(folder / "model.onnx", windows[:STAGED_WINDOWS], 256)}
                for name, folder in folders.items()}
        runs: dict[str, list[dict]] = {name: [] for name in folders}
        for _ in range(args.rounds):
            for name, folder in folders.items():  # alternating: load hits every variant alike
                runs[name].append(generate(python, folder, prompt_file))
        base = runs["builder FP32"]
        base_prefill = float(np.median([r["prefill_s"] for r in base]))
        base_decode = float(np.median([r["decode_tps"] for r in base]))
        reference = base[0]["tokens"]
        for name, measured in runs.items():
            prefill = float(np.median([r["prefill_s"] for r in measured]))
            decode = float(np.median([r["decode_tps"] for r in measured]))
            identical, first = greedy_agreement(reference, measured[0]["tokens"])
            rows[name].update({
                "perplexity_vs_fp32": rows[name]["perplexity"] / rows["builder FP32"]["perplexity"],
                "staged_vs_fp32": rows[name]["staged_perplexity"] / rows["builder FP32"]["staged_perplexity"],
                "prefill_ms": 1000 * prefill, "prefill_speedup": base_prefill / prefill,
                "decode_tps": decode, "decode_speedup": decode / base_decode,
                "identical_tokens": identical, "first_divergence": first,
                "peak_rss_mb": float(np.median([r["peak_rss_mb"] for r in measured])),
                "note": notes.get(name, "")})
            print(rows[name], flush=True)
        profiles = {name: decode_kernel_time_by_op(folders[name] / "model.onnx", PROMPT_TOKENS)
                    for name in ("builder FP32", "MatMulNBits int4 (weight-only, block 32)",
                                 "MatMulNBits int8 (weight-only, block 32)",
                                 "sqonnx defaults (--level auto, portable 7-bit weights)",
                                 "sqonnx --weights int4 (W4A8)") if name in folders}

    RESULTS.mkdir(exist_ok=True)
    stem = "genai_bench-only" if only else "genai_bench"
    (RESULTS / f"{stem}.json").write_text(json.dumps({"rows": list(rows.values()), "profiles": profiles},
                                                         indent=2))
    lines = [f"| variant | perplexity (vs FP32) | staged: 256 tokens prompt, then one at a time | prefill "
             f"{PROMPT_TOKENS} tok | decode tok/s | greedy tokens identical to FP32 ({NEW_TOKENS}) | "
             "first divergence | size MB | peak RSS MB |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows.values():
        lines.append(f"| {r['variant']} | {r['perplexity']:.2f} ({r['perplexity_vs_fp32']:.3f}) | "
                     f"{r['staged_perplexity']:.2f} ({r['staged_vs_fp32']:.3f}) | "
                     f"{r['prefill_ms']:.0f} ms ({r['prefill_speedup']:.2f}x) | {r['decode_tps']:.1f} "
                     f"({r['decode_speedup']:.2f}x) | {r['identical_tokens']:.0%} | {r['first_divergence']} | "
                     f"{r['size_mb']:.0f} | {r['peak_rss_mb']:.0f} |")
    lines += ["", f"Kernel time per op type at one decode token (onnxruntime profiler, past {PROMPT_TOKENS}):", "",
              *decode_profile_table(profiles)]
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
