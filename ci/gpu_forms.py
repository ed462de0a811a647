#!/usr/bin/env python
"""The GPU targets over the whole zoo: every family, and onnxruntime-genai's graph form, in FP32, FP16 and BF16, for
`--target tensorrt` and `--target cuda`: written or refused (and why), the TensorRT rules checker on every TensorRT
form, the opset written, the Q/DQ scale types, float32 islands (Casts around quantized layers) and layers kept float.

FP16 zoo models are optimum exports of the model in float16; BF16 ones (and the genai form's half types) are the
FP32 export with every float type made half (tests/test_half.to_bfloat16's conversion), what such exports hold.
    python ci/gpu_forms.py            # writes ci/results/gpu_forms.md and .json
"""

from __future__ import annotations

import json
import sys
import tempfile
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import onnx  # noqa: E402
import onnx_ir as ir  # noqa: E402

import sqonnx  # noqa: E402
from models import zoo  # noqa: E402
from sqonnx.targets.tensorrt import violation  # noqa: E402

RESULTS = REPO / "ci" / "results"
TARGETS = (sqonnx.Target.TENSORRT, sqonnx.Target.CUDA)


def models(folder: Path) -> list[tuple[str, str, Path]]:
    from tests.test_genai import build_genai

    found = []
    for family in zoo.FAMILIES:
        found.append((family, "float32", zoo.build(family)))
        try:
            found.append((family, "float16", zoo.build(family, "float16")))
        except Exception as exc:  # an exporter that cannot write the family in float16
            print(f"{family} float16: no export ({type(exc).__name__}: {str(exc)[:80]})", flush=True)
            found.append((family, "float16", zoo.to_half(zoo.build(family), folder / f"{family}-fp16" / "model.onnx",
                                                      ir.DataType.FLOAT16)))
        found.append((family, "bfloat16", zoo.to_half(zoo.build(family), folder / f"{family}-bf16" / "model.onnx",
                                                   ir.DataType.BFLOAT16)))
    genai = build_genai(folder / "genai", fused_norms=True)
    found.append(("genai", "float32", genai))
    for dtype, kind in (("float16", ir.DataType.FLOAT16), ("bfloat16", ir.DataType.BFLOAT16)):
        found.append(("genai", dtype, zoo.to_half(genai, folder / f"genai-{dtype}" / "model.onnx", kind)))
    return found


def row(family: str, dtype: str, model: Path, target: sqonnx.Target, folder: Path) -> dict[str, object]:
    out = folder / f"{family}-{dtype}-{target.value}" / "model.onnx"
    data = zoo.save_npz(zoo.build(family), folder / f"{family}.npz", samples=8, seq=32, seed=0) \
        if family != "genai" else None
    calibration = sqonnx.CalibrationConfig(data=data, num_samples=8, seq_len=24, own_text=0)
    try:
        report = sqonnx.quantize(model, out, sqonnx.QuantizeConfig(calibration=calibration, target=target,
                                                                   verify_fusion=False, allow_lossy=True))
    except sqonnx.SqonnxError as exc:
        return {"family": family, "dtype": dtype, "target": target.value, "written": False, "why": str(exc)}
    proto = onnx.load(str(out))
    init = {t.name: t.data_type for t in proto.graph.initializer}
    scales = Counter(onnx.TensorProto.DataType.Name(init[n.input[1]]) for n in proto.graph.node
                     if n.op_type in ("QuantizeLinear", "DequantizeLinear") and n.input[1] in init)
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    checked = violation(ir.load(out).graph, opset) if target is sqonnx.Target.TENSORRT else None
    return {"family": family, "dtype": dtype, "target": target.value, "written": True, "opset": opset,
            "scales": dict(scales), "islands": sum(n.name.endswith("/input_Cast") for n in proto.graph.node),
            "quantized": len(report.quantized_layers), "layers": len(report.layers),
            "float": len(report.layers) - len(report.quantized_layers),
            "tensorrt_rules": "pass" if checked is None else checked,
            "check": report.check.summary() if report.check is not None else ""}


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory(prefix="sqonnx-gpu-forms-") as scratch:
        folder = Path(scratch)
        for family, dtype, model in models(folder):
            for target in TARGETS:
                found = row(family, dtype, model, target, folder)
                print(json.dumps(found), flush=True)
                rows.append(found)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "gpu_forms.json").write_text(json.dumps(rows, indent=1))
    lines = ["| family | dtype | target | written | opset | Q/DQ scale types | float32 islands | INT8 layers | "
             "TensorRT rules |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if not r["written"]:
            lines.append(f"| {r['family']} | {r['dtype']} | {r['target']} | refused: {r['why']} | | | | | |")
            continue
        rules = r["tensorrt_rules"] if r["target"] == "tensorrt" else ""
        lines.append(f"| {r['family']} | {r['dtype']} | {r['target']} | yes | {r['opset']} | "
                     f"{', '.join(f'{k} {v}' for k, v in sorted(r['scales'].items()))} | {r['islands']} | "
                     f"{r['quantized']} of {r['layers']} | {rules} |")
    refused = sum(not r["written"] for r in rows)
    lines.append(f"\n{len(rows)} runs, {refused} refused.")
    (RESULTS / "gpu_forms.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
