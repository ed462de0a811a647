#!/usr/bin/env python
"""Quality of sqonnx's options on the two real models, measured side by side in one run.

Every row on two domains, FP32 first: held-out pydoc text (the default calibration's register), and English legal
prose (ci/data/legal_prose.txt: the GPL 3, GPL 2 and Apache 2.0 texts), which no calibration here reads.
SmolLM2-135M: perplexity on 16 windows of 512 tokens of each.
all-MiniLM-L6-v2: mean cosine of sentence embeddings to FP32 (64 paragraphs of each).
Rows: FP32, O3 without smoothing (--no-smooth), the main command (--alpha 0.5 --static) with and without the
residual-stream rotation, the per-layer level (--level auto, the default) with and without rotation, the
defaults with the LM head left float, O1 with 8-bit weights, GPTQ's sequential mode; for MiniLM the defaults,
--static, the float-FFN recipe and the sequential mode. Every SmolLM2 row also gets its prefill speed-up over
FP32 (512 tokens, alternating runs). Size and memory are ci/bench.py's job.
Writes ci/results/quality.md and quality.json (--output names them); `make quality` runs it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import sqonnx  # noqa: E402
from models import minilm, smollm2  # noqa: E402
from models.evaluate import (  # noqa: E402
    DOMAINS,
    eval_windows,
    latency,
    mean_cosine,
    perplexity,
    sentence_embeddings,
    sentences,
)

RESULTS = Path(__file__).resolve().parent / "results"


# BERT is post-LN: its LayerNorm outputs also feed residual Adds, so nothing absorbs 1/s; explicit Muls
# where they pay (the default --unabsorbed auto). The older recipe keeps the FFN output projections (input:
# GELU output) in float, for comparison with the default's per-token level there.
BERT_RECIPE = {"unabsorbed": sqonnx.Unabsorbed.MUL, "exclude": ("*lm_head*", "*layer.*/output/dense*"),
               "per_token_where_needed": False}
STATIC = {"per_token_where_needed": False}  # --static: O3 everywhere


def variants(samples: int, seq_len: int, extra: dict[str, dict] | None = None) -> dict[str, sqonnx.QuantizeConfig]:
    calibration = sqonnx.CalibrationConfig(num_samples=samples, seq_len=seq_len)
    configs = {
        "O3, no smoothing (--no-smooth --static)": sqonnx.QuantizeConfig(smooth=False, per_token_where_needed=False,
                                                                         calibration=calibration),
    }
    for name, options in (extra or {}).items():
        configs[name] = sqonnx.QuantizeConfig(**{"alpha": 0.5, **options}, calibration=calibration)
    return configs


def prefill_speedup(fp32: Path, int8: Path, rounds: int = 3) -> float:
    """FP32 / INT8 latency at 512 tokens, measured in alternation so machine load hits both alike."""
    ratios = [latency(fp32, 512) / latency(int8, 512) for _ in range(rounds)]
    return sorted(ratios)[len(ratios) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-samples", type=int, default=128)
    parser.add_argument("--only", help="substrings separated by |: run only the variants whose name has one")
    parser.add_argument("--output", default="quality", help="file name (no suffix) of the results in ci/results")
    args = parser.parse_args()
    wanted = [w for w in (args.only or "").split("|") if w]
    rows = []

    fp32 = smollm2.build()
    windows = {domain: eval_windows(fp32.parent, 512, 16, domain) for domain in DOMAINS}
    base = {domain: perplexity(fp32, w) for domain, w in windows.items()}
    rows.append({"model": "SmolLM2-135M", "variant": "FP32", "metric": "perplexity", "values": base,
                 "vs_fp32": {d: 1.0 for d in DOMAINS}, "prefill_speedup": 1.0, "size_mb": fp32.stat().st_size / 1e6})
    smollm2_extra = {
        "O3 everywhere, --alpha 0.5 --static --no-rotate (the main command before rotation)": {**STATIC,
                                                                                               "rotate": False},
        "O3 everywhere, --alpha 0.5 --static (the main command: rotated)": STATIC,
        "--level auto, --alpha 0.5 --no-rotate": {"rotate": False},
        "--level auto, --alpha 0.5, rotated (defaults)": {},
        "defaults with the LM head float (--exclude '*lm_head*')": {"exclude": ("*lm_head*",)},
        "O1, --alpha 0.5, rotated, 8-bit weights (--target x86-vnni --full-range)": {
            "level": sqonnx.Level.O1, "target": sqonnx.Target.X86_VNNI, "reduce_range": False},
        # GPTQ's sequential mode: each layer calibrated on the INT8 layers before it (blocks of one layer, so
        # that every layer sees them; the block size alone changes nothing)
        "defaults, --sequential --block-size 16 (each layer calibrated on the INT8 layers before)": {
            "sequential": True, "block_bytes": 16 << 20},
        "O3 everywhere, --static --sequential --block-size 16": {**STATIC, "sequential": True,
                                                                 "block_bytes": 16 << 20},
    }
    for name, config in variants(args.num_samples, 512, smollm2_extra).items():
        if wanted and not any(w in name for w in wanted):
            continue
        out = fp32.with_name(f"quality-{len(rows)}.onnx")
        start = time.perf_counter()
        report = sqonnx.quantize(fp32, out, config)
        seconds = time.perf_counter() - start
        values = {domain: perplexity(out, w) for domain, w in windows.items()}
        rows.append({"model": "SmolLM2-135M", "variant": name, "metric": "perplexity", "values": values,
                     "vs_fp32": {d: values[d] / base[d] for d in DOMAINS},
                     "prefill_speedup": prefill_speedup(fp32, out),
                     "size_mb": out.stat().st_size / 1e6, "quantize_s": seconds,
                     "check": report.check.summary() if report.check else "",
                     **({"keep_float": report.settings["keep_float"]} if "keep_float" in report.settings else {})})
        print(rows[-1], flush=True)

    encoder = minilm.build()
    texts = {domain: sentences(encoder.parent, 64, domain=domain) for domain in DOMAINS}
    reference = {domain: sentence_embeddings(encoder, t) for domain, t in texts.items()}
    rows.append({"model": "all-MiniLM-L6-v2", "variant": "FP32", "metric": "cosine to FP32",
                 "values": {d: 1.0 for d in DOMAINS}, "vs_fp32": {d: 1.0 for d in DOMAINS},
                 "size_mb": encoder.stat().st_size / 1e6})
    recipe = {"--level auto, --alpha 0.5 (defaults)": {},
              "O3 everywhere, --alpha 0.5 --static": STATIC,
              "O3, --unabsorbed mul --exclude '*layer.*/output/dense*' (6 layers float)": BERT_RECIPE,
              "O1, --alpha 0.5": {"level": sqonnx.Level.O1},
              "defaults, --sequential --block-size 8": {"sequential": True, "block_bytes": 8 << 20}}
    for name, config in variants(args.num_samples, 128, recipe).items():
        if wanted and not any(w in name for w in wanted):
            continue
        out = encoder.with_name(f"quality-{len(rows)}.onnx")
        sqonnx.quantize(encoder, out, config)
        values = {domain: mean_cosine(sentence_embeddings(out, t), reference[domain]) for domain, t in texts.items()}
        rows.append({"model": "all-MiniLM-L6-v2", "variant": name, "metric": "cosine to FP32", "values": values,
                     "vs_fp32": values, "size_mb": out.stat().st_size / 1e6})
        print(rows[-1], flush=True)

    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.output}.json").write_text(json.dumps(rows, indent=2))
    lines = ["| model | variant | metric | pydoc (held out) | vs FP32 | legal prose (second domain) | vs FP32 | "
             "prefill speed-up (512 tok) | size MB |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        speed = f"{r['prefill_speedup']:.2f}x" if "prefill_speedup" in r else ""
        cells = " | ".join(f"{r['values'][d]:.4g} | {r['vs_fp32'][d]:.3f}" for d in DOMAINS)
        lines.append(f"| {r['model']} | {r['variant']} | {r['metric']} | {cells} | {speed} | {r['size_mb']:.0f} |")
    (RESULTS / f"{args.output}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
