#!/usr/bin/env python
"""Peak memory of `sqonnx quantize` on SmolLM2 with 32 vs 256 calibration samples, side by side.

The calibrator keeps only running per-channel maxima, so the peak should not grow with the sample count.
Each run is a child process; its peak RSS comes from the kernel (wait4 rusage).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models import smollm2  # noqa: E402


def peak_rss_mb(args: list[str]) -> tuple[float, float]:
    start = time.perf_counter()
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(args)}")
    return usage.ru_maxrss / 1024, time.perf_counter() - start


def main() -> None:
    model = smollm2.build()
    size_mb = model.stat().st_size / 1e6
    print(f"FP32 model file: {size_mb:.0f} MB")
    with tempfile.TemporaryDirectory() as tmp:
        for samples in (32, 256):
            rss, seconds = peak_rss_mb([sys.executable, "-m", "sqonnx", "quantize", str(model), "-o",
                                        str(Path(tmp) / "q.onnx"), "--num-samples", str(samples), "--no-verify"])
            print(f"{samples:>4} samples: peak RSS {rss:.0f} MB ({rss / size_mb:.2f}x the FP32 file), {seconds:.0f} s",
                  flush=True)


if __name__ == "__main__":
    main()
