"""Coverage of every family in the test zoo: linear layers found, on integer kernels, smoothed (by
absorber kind), and why the rest are not. Writes ci/results/coverage.md / coverage.json, the README table.

    .venv/bin/python ci/coverage.py [family ...]

Each family is a tiny trained-like model from tests/zoo.py (2 layers, hidden 64, planted outlier channels),
quantized at the main command's settings (`--alpha 0.5 --static`) with an .npz of random token windows.
"Linear layers" counts MatMul/Gemm whose weight is a constant in the exported file, read directly, through
Identity or from a Constant node, independently of sqonnx's own matcher.
"""

from __future__ import annotations

import collections
import json
import sys
import tempfile
from pathlib import Path

import onnx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import sqonnx  # noqa: E402
from sqonnx import CalibrationConfig, QuantizeConfig  # noqa: E402
from tests import zoo  # noqa: E402

RESULTS = REPO / "ci" / "results"


def constant_weight_layers(path: Path) -> int:
    """MatMul/Gemm nodes whose second input is a 2-D float constant, seen through Identity/Constant."""
    graph = onnx.load(str(path), load_external_data=False).graph
    constants = {init.name: list(init.dims) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            constants[node.output[0]] = list(node.attribute[0].t.dims)
    changed = True
    while changed:
        changed = False
        for node in graph.node:
            if node.op_type == "Identity" and node.input[0] in constants and node.output[0] not in constants:
                constants[node.output[0]] = constants[node.input[0]]
                changed = True
    return sum(1 for node in graph.node if node.op_type in ("MatMul", "Gemm") and len(node.input) > 1
               and len(constants.get(node.input[1], [])) == 2)


def survey(family: str, workdir: Path, config: QuantizeConfig | None = None) -> dict[str, object]:
    model = zoo.build(family)
    npz = zoo.save_npz(model, workdir / f"{family}.npz", samples=8, seq=32, seed=0)
    config = config or QuantizeConfig(alpha=0.5, exclude=(), calibration=CalibrationConfig(data=npz, num_samples=8))
    report = sqonnx.quantize(model, workdir / f"{family}.int8.onnx", config)
    smoothed = collections.Counter(layer.smoothing for layer in report.smoothed_layers)
    reasons = collections.Counter(layer.smoothing.removeprefix("not smoothed: ")
                                  for layer in report.quantized_layers if layer.scale_min is None)
    kernels = report.kernels
    return {
        "family": family, "linear": constant_weight_layers(model), "found": len(report.layers),
        "quantized": len(report.quantized_layers),
        "integer_kernels": kernels.integer_total if kernels else 0,
        "unfused": len(kernels.unfused) if kernels else 0,
        "smoothed": len(report.smoothed_layers), "by_absorber": dict(smoothed), "not_smoothed": dict(reasons),
    }


def markdown(rows: list[dict[str, object]]) -> str:
    lines = ["| family | linear layers | found | on integer kernels | smoothed | by absorber | not smoothed, why |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        by = "; ".join(f"{n} {kind}" for kind, n in sorted(row["by_absorber"].items()))  # type: ignore[union-attr]
        why = "; ".join(f"{n}: {reason}" for reason, n in sorted(row["not_smoothed"].items()))  # type: ignore[union-attr]
        lines.append(f"| {row['family']} | {row['linear']} | {row['found']} | {row['integer_kernels']}"
                     f"{' (' + str(row['unfused']) + ' unfused)' if row['unfused'] else ''} | {row['smoothed']} | "
                     f"{by or '—'} | {why or '—'} |")
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
