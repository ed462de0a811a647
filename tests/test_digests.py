"""Byte-identical output across refactors: the same model, samples and options give the same bytes.

`tests/digests.json` holds the sha256 of what sqonnx wrote for every zoo family (defaults) and for the llama
of the zoo under each option set that takes its own path through the run (the rotation judged, --alpha auto,
--keep-float-budget, int4, the GPU targets, ...), recorded before a refactor. A change to sqonnx that is meant
to leave the output alone must keep every digest; one that changes the output on purpose records them again
(`SQONNX_RECORD_DIGESTS=1 .venv/bin/python -m pytest tests/test_digests.py`) and says so in its commit.

The output's bytes also depend on the input's bytes (the zoo is exported by torch and optimum) and on
onnxruntime's float arithmetic (calibration maxima, on this CPU's kernels). Each case records the digest of its
input too, with onnxruntime's version and the CPU's instruction set: where those differ from the recording
(another exporter, another CPU), the case is skipped with the difference named, since its digest then says
nothing about sqonnx.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

import sqonnx
from models import zoo
from sqonnx import CalibrationConfig, Level, QuantizeConfig, Rounding, Target, Weights
from tests.digests import check_digest
from tests.test_half import to_bfloat16

# Option sets run on the zoo's llama: each takes a path of its own through the run.
LLAMA_OPTIONS: dict[str, dict[str, Any]] = {
    "static-0.5": {"alpha": 0.5, "level": Level.O3, "per_token_where_needed": False},
    "alpha-auto": {"alpha": "auto"},
    "keep-float": {"keep_float_budget": 0.0},
    "int4": {"weights": Weights.INT4},
    "int8-gptq": {"weight_rounding": Rounding.GPTQ},
    "tensorrt": {"target": Target.TENSORRT},
    "cuda": {"target": Target.CUDA},
    "smooth-only": {"smooth_only": True},
    "rotate": {"rotate": True},
    "no-rotate": {"rotate": False},
    "no-smooth": {"smooth": False},
    "o1": {"level": Level.O1, "per_token_where_needed": False},
    "sequential": {"sequential": True},
    "alpha-auto-keep-float": {"alpha": "auto", "keep_float_budget": 0.0},
}
# Families whose run differs from llama's under an option (Gemma 3's run-time rotations).
OTHER_OPTIONS: dict[str, tuple[str, dict[str, Any]]] = {
    "gemma3-rotate": ("gemma3", {"rotate": True}),
    "gemma3-static": ("gemma3", {"level": Level.O3, "per_token_where_needed": False}),
    "bert-static": ("bert", {"level": Level.O3, "per_token_where_needed": False}),
}
DTYPES = ("float16", "bfloat16")


def _cases() -> list[Any]:
    cases = [(f"{family}-defaults", family, "float32", {}) for family in zoo.FAMILIES]
    cases += [(f"llama-{name}", "llama", "float32", options) for name, options in LLAMA_OPTIONS.items()]
    cases += [(name, family, "float32", options) for name, (family, options) in OTHER_OPTIONS.items()]
    cases += [(f"llama-{dtype}-defaults", "llama", dtype, {}) for dtype in DTYPES]
    cases += [(f"llama-{dtype}-{target.value}", "llama", dtype, {"target": target}) for dtype in DTYPES
              for target in (Target.TENSORRT, Target.CUDA)]
    return [pytest.param(*case, id=case[0], marks=pytest.mark.zoo) for case in cases]


@pytest.mark.parametrize(("case", "family", "dtype", "options"), _cases())
def test_output_is_byte_identical(tmp_path: Path, case: str, family: str, dtype: str,
                                  options: dict[str, Any]) -> None:
    # a bfloat16 export has ops onnxruntime's CPU provider cannot run (Where); test_half's conversion is what
    # users' bfloat16 graphs look like where it matters (constants, casts)
    model = zoo.build(family, "float32" if dtype == "bfloat16" else dtype)
    if dtype == "bfloat16":
        (tmp_path / "bf16").mkdir()
        shutil.copy(model.parent / "config.json", tmp_path / "bf16")
        model = to_bfloat16(model, tmp_path / "bf16" / "model.onnx")
    calibration = CalibrationConfig(data=zoo.save_npz(model, tmp_path / "calib.npz", samples=16, seq=32, seed=0),
                                    num_samples=16)
    out = tmp_path / "out"
    out.mkdir()
    sqonnx.quantize(model, out / "model.onnx", QuantizeConfig(calibration=calibration, allow_lossy=True, **options))
    inputs = [model, *sorted(p for p in model.parent.iterdir() if p.name.endswith(".onnx.data") or
                             p.name.endswith(".onnx_data"))]
    check_digest(case, inputs, out)
