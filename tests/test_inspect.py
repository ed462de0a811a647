"""`sqonnx inspect`: the outlier report (HTML + PNG + JSON) on the synthetic block with planted outliers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_inspect_report(tmp_path: Path, block: Path, feeds: Path) -> None:
    out = tmp_path / "report"
    result = subprocess.run([sys.executable, "-m", "sqonnx", "inspect", str(block), "--out", str(out),
                             "--calib-data", str(feeds), "--num-samples", "8", "--top", "2"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "worst activation outliers: /attn/q_proj/MatMul" in result.stdout
    groups = {tuple(g["layers"]): g for g in json.loads((out / "report.json").read_text())}
    qkv = groups[("/attn/q_proj/MatMul", "/attn/k_proj/MatMul", "/attn/v_proj/MatMul")]
    assert qkv["activation_ratio_before"] > 50 and qkv["activation_ratio_after"] < qkv["activation_ratio_before"] / 10
    assert qkv["alpha"] is not None and qkv["absorber"].endswith("(Mul (per-channel weight))")
    for layer in qkv["layers"]:  # smoothing makes each layer less sensitive to quantization
        assert qkv["sensitivity"][layer] < qkv["sensitivity_unsmoothed"][layer] / 5
    o_proj = groups[("/attn/o_proj/MatMul",)]
    assert o_proj["absorber"].startswith("nothing can absorb")
    plots = sorted(p.name for p in out.glob("*.png"))
    assert plots == ["group_00.png", "group_01.png"]
    assert all((out / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in plots)
    page = (out / "index.html").read_text()
    assert all(f'src="{p}"' in page for p in plots) and "/mlp/down_proj/MatMul" in page


def test_inspect_bad_model(tmp_path: Path) -> None:
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    result = subprocess.run([sys.executable, "-m", "sqonnx", "inspect", str(junk), "--out", str(tmp_path / "r")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.startswith("error: ") and "Traceback" not in result.stderr
    assert not (tmp_path / "r").exists()
