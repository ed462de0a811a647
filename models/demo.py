"""The quick-start job: build SmolLM2, quantize it with sqonnx's defaults (residual stream rotated, alpha 0.5,
static INT8 activations and per-token where a static range cannot hold them), compare with FP32.

Run as `python -m models.demo` (the README's `make demo` does so in the project's venv).
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import sqonnx
from models import smollm2
from models.evaluate import eval_windows, latency, perplexity


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    print("building SmolLM2-135M-Instruct (GGUF -> transformers -> ONNX; cached after the first run)...")
    fp32 = smollm2.build()
    int8 = fp32.with_name("model.sqonnx-int8.onnx")
    print(f"quantizing {fp32} (defaults: rotated, alpha 0.5, --level auto, 128 calibration samples of 512 "
          "tokens)...")
    report = sqonnx.quantize(fp32, int8, sqonnx.QuantizeConfig(alpha=0.5), progress=sys.stderr.isatty())
    print(report.summary())
    windows = eval_windows(fp32.parent, seq_len=512, max_windows=16)
    print(f"evaluating on {windows.size} held-out tokens of pydoc text...")
    rows = []
    for name, path in (("FP32", fp32), ("sqonnx INT8", int8)):
        start = time.perf_counter()
        ppl = perplexity(path, windows)
        rows.append((name, ppl, _size_mb(path), latency(path, 512), time.perf_counter() - start))
    fp32_latency = rows[0][3]
    print(f"\n{'model':<16}{'perplexity':>12}{'size MB':>10}{'prefill 512 (s)':>17}{'speed-up':>10}")
    for name, ppl, size, seconds, _ in rows:
        print(f"{name:<16}{ppl:>12.2f}{size:>10.1f}{seconds:>17.3f}{fp32_latency / seconds:>9.2f}x")


def _size_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.parent.glob(f"{path.name}*")) / 1e6


if __name__ == "__main__":
    main()
