#!/usr/bin/env python
"""Does generation match FP32? Greedy continuations of held-out prompts through the key/value cache.

Perplexity measures one forward pass; users judge generated text. SmolLM2 with past (optimum's
text-generation-with-past export) is quantized with sqonnx's variants and, for reference, onnxruntime's
weight-only MatMulNBits int8; for each of 8 held-out pydoc
prompts of 128 tokens, FP32 and INT8 each write 64 greedy tokens through the cache, and the script reports
the share of identical tokens (position by position) and where the first divergence came (median over
prompts). Writes ci/results/generation.md / generation.json.

    .venv/bin/python ci/generation.py [--prompts 8] [--tokens 64]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import sqonnx  # noqa: E402
from models import smollm2  # noqa: E402
from models.evaluate import eval_windows, greedy_tokens  # noqa: E402
from models.peers import matmul_nbits  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
VNNI = {"target": sqonnx.Target.X86_VNNI}  # 8-bit weights: CPUs with VNNI (or ARM, GPU)
VARIANTS = {
    "sqonnx defaults (rotated, --level auto, LM head INT8, decode-shaped calibration)": sqonnx.QuantizeConfig(),
    "sqonnx defaults, --target x86-vnni (8-bit weights)": sqonnx.QuantizeConfig(**VNNI),
    "sqonnx O1, rotated, --target x86-vnni": sqonnx.QuantizeConfig(level=sqonnx.Level.O1, **VNNI),
    "sqonnx O3 everywhere (--static)": sqonnx.QuantizeConfig(per_token_where_needed=False),
    "sqonnx defaults, prefill-only calibration (--decode-steps 0)": sqonnx.QuantizeConfig(
        calibration=sqonnx.CalibrationConfig(decode_steps=0)),
}
PEERS = {"onnxruntime MatMulNBits int8 weight-only (block 32), for reference": 8}


def agreement(reference: list[int], other: list[int]) -> tuple[float, int]:
    """Share of identical tokens, and the index of the first different one (len when none)."""
    same = [a == b for a, b in zip(reference, other, strict=True)]
    return float(np.mean(same)), next((i for i, s in enumerate(same) if not s), len(same))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    fp32 = smollm2.build(with_past=True)
    prompts = eval_windows(fp32.parent, 128, args.prompts)
    reference = [greedy_tokens(fp32, prompt, args.tokens)[0] for prompt in prompts]
    rows = []
    builds = [(name, lambda out, c=config: sqonnx.quantize(fp32, out, c)) for name, config in VARIANTS.items()]
    builds += [(name, lambda out, b=bits: matmul_nbits(fp32, out, b)) for name, bits in PEERS.items()]
    for name, build in builds:
        out = fp32.with_name(f"generation-{len(rows)}.onnx")
        build(out)
        results = [agreement(ref, greedy_tokens(out, prompt, args.tokens)[0])
                   for ref, prompt in zip(reference, prompts, strict=True)]
        rows.append({"variant": name, "identical": float(np.mean([r[0] for r in results])),
                     "first_divergence_median": float(np.median([r[1] for r in results])),
                     "first_divergence_min": int(min(r[1] for r in results))})
        print(rows[-1], flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "generation.json").write_text(json.dumps(rows, indent=2))
    lines = [f"| variant | identical tokens ({args.prompts} prompts x {args.tokens}) | first divergence, median | "
             "earliest |", "|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['identical']:.1%} | {r['first_divergence_median']:.0f} | "
              f"{r['first_divergence_min']} |" for r in rows]
    (RESULTS / "generation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
