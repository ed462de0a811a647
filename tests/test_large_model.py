"""A model above protobuf's 2 GB limit (9 layers of 268 MB): quantized one layer at a time, with a fraction of
its size in memory, and saved with external data."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import pytest

from tests.child import run_measured
from tests.large_model import HIDDEN, build_large_model

pytestmark = pytest.mark.large_model


def test_quantize_model_over_2gb(tmp_path: Path) -> None:
    source = build_large_model(tmp_path / "large.onnx")
    data_bytes = (tmp_path / "large.onnx.data").stat().st_size
    assert data_bytes > 2**31
    x = np.random.default_rng(0).standard_normal((3, 1, 16, HIDDEN)).astype(np.float32)
    np.savez(tmp_path / "feeds.npz", x=x[:2])
    out = tmp_path / "out" / "large-int8.onnx"
    out.parent.mkdir()
    code, output, peak = run_measured(["quantize", source, "-o", out, "--calib-data", tmp_path / "feeds.npz"],
                                      "sqonnx quantize of the 2.4 GB model did not exit", 900)
    assert code == 0, output
    print(f"peak RSS {peak / 1e9:.2f} GB for a {data_bytes / 1e9:.2f} GB model")
    # a block's weights, their rotation-free smoothed copy, the quantized codes and onnxruntime's pre-packed copy,
    # on top of the interpreter: far below the model (measured 1.03 GB for 2.4 GB)
    assert peak < 0.5 * data_bytes, f"peak RSS {peak / 1e9:.2f} GB for a {data_bytes / 1e9:.2f} GB model"
    # The input kept its weights outside the protobuf; so does the output, in a data file named after its content.
    names = sorted(p.name for p in out.parent.iterdir())
    assert len(names) == 2 and names[0] == "large-int8.onnx", names
    assert re.fullmatch(r"large-int8\.onnx\.[0-9a-f]{16}\.data", names[1]), names
    onnx.checker.check_model(str(out))
    import onnxruntime as ort

    expected = ort.InferenceSession(str(source)).run(None, {"x": x[2]})[0] - x[2]
    got = ort.InferenceSession(str(out)).run(None, {"x": x[2]})[0] - x[2]
    assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < 0.1  # 9 stacked 7-bit layers
