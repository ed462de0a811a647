#!/usr/bin/env python
"""Does generation match FP32? Greedy continuations of held-out prompts through the key/value cache.

Perplexity measures one forward pass; users judge generated text. SmolLM2 with past (optimum's
text-generation-with-past export) is quantized with sqonnx's variants and, for reference, onnxruntime's
weight-only MatMulNBits int8. For each of 8 held-out pydoc prompts of 128 tokens, FP32 and INT8 each write
64 greedy tokens through the cache; reported: the share of identical tokens (position by position), where
the first divergence came (median over prompts), the share of steps where INT8, fed FP32's own
continuation, picks FP32's next token (teacher-forced: one step's fidelity without the cascade that follows
a first divergence), the decode speed-up over FP32 (the same greedy decodes, FP32 and INT8 timed
alternately), and the profiler's kernel time per op type at one decode token for FP32 and the first
variant. Writes ci/results/generation.md / generation.json.

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
from models.evaluate import (  # noqa: E402
    decode_kernel_time_by_op,
    eval_windows,
    greedy_agreement,
    greedy_tokens,
    next_token_choices,
)
from models.peers import matmul_nbits  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
VNNI = {"target": sqonnx.Target.X86_VNNI}  # 8-bit weights: for CPUs with VNNI (or ARM, GPU)
VARIANTS = {
    "sqonnx defaults (rotated, --level auto, LM head INT8, decode-shaped calibration)": sqonnx.QuantizeConfig(),
    "sqonnx defaults, --target x86-vnni (8-bit weights)": sqonnx.QuantizeConfig(**VNNI),
    "sqonnx O1, rotated, --target x86-vnni": sqonnx.QuantizeConfig(level=sqonnx.Level.O1, **VNNI),
    "sqonnx O3 everywhere (--static)": sqonnx.QuantizeConfig(per_token_where_needed=False),
    "sqonnx defaults, prefill-only calibration (--decode-steps 0)": sqonnx.QuantizeConfig(
        calibration=sqonnx.CalibrationConfig(decode_steps=0)),
}
PEERS = {"onnxruntime MatMulNBits int8 weight-only (block 32), for reference": 8}


def decode_profile_table(profiles: dict[str, dict[str, tuple[float, float]]], top: int = 10) -> list[str]:
    """Markdown rows: milliseconds per decode step and share, per op type, the largest first."""
    lines = ["| op | " + " | ".join(profiles) + " |", "|---|" + "---|" * len(profiles)]
    ops = sorted({op for p in profiles.values() for op in p},
                 key=lambda op: -max(p.get(op, (0.0, 0.0))[1] for p in profiles.values()))
    for op in ops[:top]:
        lines.append(f"| {op} | " + " | ".join(f"{p[op][1]:.2f} ms ({p[op][0]:.0%})" if op in p else ""
                                               for p in profiles.values()) + " |")
    lines.append("| total | " + " | ".join(f"{sum(v[1] for v in p.values()):.2f} ms" for p in profiles.values())
                 + " |")
    return lines


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
    profiles = {"FP32": decode_kernel_time_by_op(fp32, 256)}
    for name, build in builds:
        out = fp32.with_name(f"generation-{len(rows)}.onnx")
        build(out)
        results, forced, fp32_seconds, seconds = [], [], 0.0, 0.0
        for ref, prompt in zip(reference, prompts, strict=True):
            fp32_seconds += greedy_tokens(fp32, prompt, args.tokens)[1]  # alternating: load hits both alike
            tokens, elapsed = greedy_tokens(out, prompt, args.tokens)
            seconds += elapsed
            results.append(greedy_agreement(ref, tokens))
            # Teacher-forced: fed FP32's own continuation, does INT8 choose FP32's next token at each step?
            choices = next_token_choices(out, np.concatenate([prompt, ref[:-1]]).astype(np.int64))
            forced.append(float(np.mean(choices[len(prompt) - 1:] == np.asarray(ref))))
        rows.append({"variant": name, "identical": float(np.mean([r[0] for r in results])),
                     "first_divergence_median": float(np.median([r[1] for r in results])),
                     "first_divergence_min": int(min(r[1] for r in results)),
                     "teacher_forced_top1": float(np.mean(forced)), "decode_speedup": fp32_seconds / seconds})
        if not profiles.keys() - {"FP32"}:
            profiles[name] = decode_kernel_time_by_op(out, 256)
        print(rows[-1], flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "generation.json").write_text(json.dumps({"rows": rows, "profiles": profiles}, indent=2))
    lines = [f"| variant | identical tokens ({args.prompts} prompts x {args.tokens}) | first divergence, median | "
             "earliest | same next token, teacher-forced | decode speed-up |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['identical']:.1%} | {r['first_divergence_median']:.0f} | "
              f"{r['first_divergence_min']} | {r['teacher_forced_top1']:.1%} | {r['decode_speedup']:.2f}x |"
              for r in rows]
    lines += ["", "Kernel time per op type at one decode token (past 256, onnxruntime profiler):", "",
              *decode_profile_table(profiles)]
    (RESULTS / "generation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
