"""Coverage of every family in the test zoo: linear layers found, on integer kernels, smoothed (by
absorber kind), and why the rest are not. Writes ci/results/coverage.md / coverage.json, the README table.

    .venv/bin/python ci/coverage.py [family ...]

Each family is a tiny trained-like model from models/zoo.py (2 layers, hidden 64, planted outlier channels),
quantized with the defaults (α 0.5, rotation where exact, --level auto, LM head included) with an .npz of
random token windows. "Linear layers" counts MatMul/Gemm whose weight is a constant in the exported
file, read directly, through Identity, a Transpose (a tied LM head) or from a Constant node, independently
of sqonnx's own matcher (`models.zoo.constant_weight_layers`). The logits error is
the relative L2 error against FP32 on held-out windows, with the defaults and with --no-smooth.
"""

from __future__ import annotations

import collections
import json
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import sqonnx  # noqa: E402
from models import zoo  # noqa: E402
from sqonnx import CalibrationConfig, QuantizeConfig  # noqa: E402

RESULTS = REPO / "ci" / "results"


def logits_error(model: Path, quantized: Path) -> float:
    """Relative L2 error of the logits (encoders: last hidden state) on held-out token windows."""
    held_out = zoo.feeds(model, 4, 32, seed=1)
    reference, got = zoo.logits(model, held_out), zoo.logits(quantized, held_out)
    return float(np.linalg.norm(got - reference) / np.linalg.norm(reference))


def survey(family: str, workdir: Path) -> dict[str, object]:
    model = zoo.build(family)
    npz = zoo.save_npz(model, workdir / f"{family}.npz", samples=8, seq=32, seed=0)
    config = QuantizeConfig(alpha=0.5, calibration=CalibrationConfig(data=npz, num_samples=8))
    report = sqonnx.quantize(model, workdir / f"{family}.int8.onnx", config)
    sqonnx.quantize(model, workdir / f"{family}.plain.onnx", replace(config, smooth=False))
    # What can be smoothed exactly (the default policy then skips groups where calibration shows no gain).
    capable = sqonnx.quantize(model, workdir / f"{family}.smoothed.onnx", replace(config, smooth_only=True))
    quantized = {layer.name for layer in report.quantized_layers}
    smoothed = collections.Counter(layer.smoothing for layer in capable.smoothed_layers if layer.name in quantized)
    reasons = collections.Counter(layer.smoothing.removeprefix("not smoothed: ") for layer in capable.layers
                                  if layer.name in quantized and layer.scale_min is None)
    kernels = report.kernels
    return {
        "family": family, "linear": zoo.constant_weight_layers(model), "found": len(report.layers),
        "quantized": len(report.quantized_layers),
        "integer_kernels": kernels.integer_total if kernels else 0,
        "unfused": len(kernels.unfused) if kernels else 0,
        "smoothed": sum(smoothed.values()), "smoothed_by_default": len(report.smoothed_layers),
        "by_absorber": dict(smoothed), "not_smoothed": dict(reasons),
        "error_smoothed": logits_error(model, workdir / f"{family}.int8.onnx"),
        "error_unsmoothed": logits_error(model, workdir / f"{family}.plain.onnx"),
    }


def markdown(rows: list[dict[str, object]]) -> str:
    lines = ["| family | linear layers | found | quantized layers on integer kernels | smoothable exactly | by absorber"
             " | not smoothable, why | smoothed by the default policy | logits error, defaults / --no-smooth |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        by = "; ".join(f"{n} {kind}" for kind, n in sorted(row["by_absorber"].items()))  # type: ignore[union-attr]
        why = "; ".join(f"{n}: {reason}" for reason, n in sorted(row["not_smoothed"].items()))  # type: ignore[union-attr]
        lines.append(f"| {row['family']} | {row['linear']} | {row['found']} | {row['integer_kernels']} of "
                     f"{row['quantized']}"
                     f"{' (' + str(row['unfused']) + ' unfused)' if row['unfused'] else ''} | {row['smoothed']} | "
                     f"{by or '—'} | {why or '—'} | {row['smoothed_by_default']} | "
                     f"{row['error_smoothed']:.3f} / {row['error_unsmoothed']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    families = sys.argv[1:] or list(zoo.FAMILIES)
    with tempfile.TemporaryDirectory(prefix="sqonnx-coverage-") as tmp:
        rows = [survey(family, Path(tmp)) for family in families]
    text = markdown(rows)
    print(text)
    if not sys.argv[1:]:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "coverage.md").write_text(text)
        (RESULTS / "coverage.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
