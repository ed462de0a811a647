#!/usr/bin/env python
"""The fastest prompt and the fastest decode in one graph: `--decode-weights int4` against each form alone.

SmolLM2-135M with past (optimum's text-generation-with-past export, run by plain onnxruntime as its generation loop
runs it), quantized from one calibration each: the W8A8 defaults, `--weights int4` (W4A8), and `--decode-weights
int4` (W8A8 prompt stage, W4A8 decode stage, one graph branching on the token count). Side by side in one run:

- perplexity of whole windows (one run each: what the prompt stage computes), on held-out pydoc;
- staged perplexity, as generation computes it: the first half of each window as the prompt, every later token alone
  through the key/value cache (teacher-forced), on held-out pydoc and on legal prose (the second domain,
  ci/data/legal_prose.txt): for `--decode-weights` the decode stage reads the cache the prompt stage wrote;
- greedy continuations of 8 held-out pydoc prompts through the cache: tokens identical to FP32's;
- prefill of a 256-token prompt and decode tokens/s (64 greedy tokens after it), as ratios to FP32 measured in
  alternating rounds (load hits every variant alike);
- file size, and the peak RSS of a child process that loads the model and runs the prompt and the decode.

Writes ci/results/phases.md and phases.json.

    .venv/bin/python ci/phases.py [--rounds 3] [--windows 8] [--samples 128]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

import sqonnx  # noqa: E402
from ci.bench import size_mb  # noqa: E402
from models import smollm2  # noqa: E402
from models.evaluate import (  # noqa: E402
    DOMAINS,
    decode_seconds,
    eval_windows,
    greedy_agreement,
    greedy_tokens,
    latency,
    perplexity,
    staged_perplexity,
)

RESULTS = Path(__file__).resolve().parent / "results"
PROMPT_TOKENS, NEW_TOKENS, WINDOW = 256, 64, 512
VARIANTS = {
    "sqonnx defaults (W8A8)": {},
    "sqonnx --weights int4 (W4A8)": {"weights": sqonnx.Weights.INT4},
    "sqonnx --decode-weights int4 (W8A8 prompt, W4A8 decode)": {"decode_weights": sqonnx.Weights.INT4},
}


def child_peak(model: Path, prompt: np.ndarray) -> float:
    """Peak RSS (MB) of a fresh process that loads `model`, runs the prompt and NEW_TOKENS decode steps."""
    code = ("import sys, json, numpy as np; from pathlib import Path; sys.path.insert(0, '.');"
            "from models.evaluate import greedy_tokens;"
            f"greedy_tokens(Path({str(model)!r}), np.array({[int(t) for t in prompt]}), {NEW_TOKENS});"
            "print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).resolve().parent.parent)
    return int(done.stdout.strip().splitlines()[-1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--windows", type=int, default=8, help="windows of 512 tokens per domain")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--samples", type=int, default=128, help="calibration samples")
    args = parser.parse_args()
    fp32 = smollm2.build(with_past=True)
    windows = {domain: eval_windows(fp32.parent, WINDOW, args.windows, domain) for domain in DOMAINS}
    prompts = eval_windows(fp32.parent, 128, args.prompts)
    timing_prompt = eval_windows(fp32.parent, PROMPT_TOKENS, 1)[0]
    # beside the export: its config.json tells the evaluation the cache's sizes
    written = [fp32.with_name(f"phases-{index}.onnx") for index in range(len(VARIANTS))]
    try:
        models = {"FP32": fp32}
        notes: dict[str, str] = {}
        for index, (name, options) in enumerate(VARIANTS.items()):
            out = written[index]
            config = sqonnx.QuantizeConfig(calibration=sqonnx.CalibrationConfig(num_samples=args.samples), **options)
            start = time.perf_counter()
            report = sqonnx.quantize(fp32, out, config)
            notes[name] = f"quantized in {time.perf_counter() - start:.0f} s; peak {report.peak_rss_bytes / 1e9:.1f} GB"
            print(name, notes[name], flush=True)
            models[name] = out
        rows: dict[str, dict[str, object]] = {}
        for name, model in models.items():
            row: dict[str, object] = {"variant": name, "size_mb": size_mb(model), "note": notes.get(name, "")}
            row["perplexity"] = perplexity(model, windows["pydoc"])
            for domain, domain_windows in windows.items():
                row[f"staged {domain}"] = staged_perplexity(model, domain_windows, WINDOW // 2)
            row["peak_rss_mb"] = child_peak(model, timing_prompt)
            rows[name] = row
            print(row, flush=True)
        reference = [greedy_tokens(fp32, prompt, NEW_TOKENS)[0] for prompt in prompts]
        for name, model in models.items():
            agreement = [greedy_agreement(ref, greedy_tokens(model, prompt, NEW_TOKENS)[0])
                         for ref, prompt in zip(reference, prompts, strict=True)]
            rows[name]["identical"] = float(np.mean([a[0] for a in agreement]))
            rows[name]["first_divergence_median"] = float(np.median([a[1] for a in agreement]))
        prefill: dict[str, list[float]] = {name: [] for name in models}
        decode: dict[str, list[float]] = {name: [] for name in models}
        for _ in range(args.rounds):
            for name, model in models.items():  # alternating: load hits every variant alike
                prefill[name].append(latency(model, PROMPT_TOKENS, repeats=3))
                decode[name].append(NEW_TOKENS / decode_seconds(model, timing_prompt, NEW_TOKENS))
        base_prefill, base_decode = np.median(prefill["FP32"]), np.median(decode["FP32"])
        base = rows["FP32"]
        for name, row in rows.items():
            row["prefill_ms"] = 1000 * float(np.median(prefill[name]))
            row["prefill_speedup"] = float(base_prefill / np.median(prefill[name]))
            row["decode_tps"] = float(np.median(decode[name]))
            row["decode_speedup"] = float(np.median(decode[name]) / base_decode)
            for key in ("perplexity", *(f"staged {d}" for d in DOMAINS)):
                row[f"{key} vs FP32"] = float(row[key]) / float(base[key]) - 1  # type: ignore[arg-type]
    finally:
        for out in written:
            for path in out.parent.glob(f"{out.name}*"):
                path.unlink()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "phases.json").write_text(json.dumps(list(rows.values()), indent=2))
    lines = [f"| variant | perplexity, whole windows (pydoc) | staged: pydoc | staged: legal prose | "
             f"greedy tokens identical to FP32 ({args.prompts} x {NEW_TOKENS}) | prefill {PROMPT_TOKENS} tok | "
             "decode tok/s | size MB | peak RSS MB |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows.values():
        def cell(key: str, row: dict[str, object] = r) -> str:
            return f"{row[key]:.2f}" + ("" if row is base else f" ({row[f'{key} vs FP32']:+.1%})")
        lines.append(f"| {r['variant']} | {cell('perplexity')} | {cell('staged pydoc')} | {cell('staged legal prose')} "
                     f"| {r['identical']:.0%} (first divergence {r['first_divergence_median']:.0f}) | "
                     f"{r['prefill_ms']:.0f} ms ({r['prefill_speedup']:.2f}x) | {r['decode_tps']:.1f} "
                     f"({r['decode_speedup']:.2f}x) | {r['size_mb']:.0f} | {r['peak_rss_mb']:.0f} |")
    (RESULTS / "phases.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
