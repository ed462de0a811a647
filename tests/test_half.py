"""Half-precision models in: an FP16 export (the zoo's Llama exported from the model in float16) and a BF16 model are
calibrated in float32, smoothed exactly (up to the half type's rounding), written with their own float type
for everything that stays float and float32 islands around the integer kernels, and lose no more than the
FP32 model does to INT8."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import sqonnx
from models import zoo
from sqonnx import CalibrationConfig, QuantizeConfig
from sqonnx.runtime.upcast import HALF_TYPES, upcast_to_float32

pytestmark = pytest.mark.zoo

FLOAT, FLOAT16, BFLOAT16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16


def to_bfloat16(source: Path, target: Path) -> Path:
    """The model with every float32 type, constant and Cast target made bfloat16 (what an export in bfloat16
    holds; onnxruntime's CPU provider cannot run it, so optimum's exporter cannot export one here)."""
    return zoo.to_half(source, target, ir.DataType.BFLOAT16)


def upcast_copy(path: Path, target: Path) -> Path:
    ir.save(upcast_to_float32(ir.load(path)), target)
    return target


def logits_error(model: Path, reference: np.ndarray, feeds: list[dict[str, np.ndarray]]) -> float:
    got = zoo.logits(model, feeds).astype(np.float64)
    return float(np.linalg.norm(got - reference) / np.linalg.norm(reference))


@pytest.fixture(scope="module")
def calibration(tmp_path_factory: pytest.TempPathFactory) -> CalibrationConfig:
    folder = tmp_path_factory.mktemp("calibration")
    return CalibrationConfig(data=zoo.save_npz(zoo.build("llama"), folder / "c.npz", samples=4, seq=32, seed=0),
                             num_samples=4)


def test_fp16_export_in_fp16_out(tmp_path: Path, calibration: CalibrationConfig) -> None:
    fp16, fp32 = zoo.build("llama", "float16"), zoo.build("llama")
    feeds = zoo.feeds(fp32, 2, 32, seed=7)
    upcast = zoo.logits(upcast_copy(fp16, tmp_path / "upcast.onnx"), feeds).astype(np.float64)
    rounding = logits_error(fp16, upcast, feeds)  # what float16 itself costs against its exact float32 upcast
    assert 0 < rounding < 2e-3

    sqonnx.quantize(fp16, tmp_path / "smoothed.onnx", QuantizeConfig(smooth_only=True, exclude=(),
                                                                     calibration=calibration))
    assert logits_error(tmp_path / "smoothed.onnx", upcast, feeds) < 5 * rounding  # rotation and smoothing: exact
    # up to storing the folded weights in float16

    out = tmp_path / "int8.onnx"
    report = sqonnx.quantize(fp16, out, QuantizeConfig(calibration=calibration))
    assert report.settings["rotation"].startswith("rotated"), report.settings["rotation"]
    assert len(report.smoothed_layers) == len(report.quantized_layers) == 15
    assert report.kernels is not None and report.kernels.integer_kernels == {"MatMulIntegerToFloat": 15}
    onnx.checker.check_model(str(out))
    proto = onnx.load(str(out))
    assert proto.graph.output[0].type.tensor_type.elem_type == FLOAT16
    types = Counter(t.data_type for t in proto.graph.initializer if len(t.dims) and np.prod(t.dims) > 1)
    # float32 only where the export had it (rotary tables) and for the islands' quantization scales
    source = onnx.load(str(fp16)).graph
    exported = {t.name for t in source.initializer if t.data_type == FLOAT} | {
        n.output[0] for n in source.node if n.op_type == "Constant" and n.attribute[0].t.data_type == FLOAT}
    float32 = [t.name for t in proto.graph.initializer if t.data_type == FLOAT and len(t.dims)
               and np.prod(t.dims) > 1 and t.name not in exported]
    assert float32 and all(name.endswith("_scale") for name in float32), float32
    weights = [t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 2]
    assert types[FLOAT16] > 0 and len(weights) == 15
    islands = Counter(n.op_type for n in proto.graph.node if n.name.endswith(("input_Cast", "output_Cast")))
    assert islands["Cast"] >= 2 * 11  # in and out of every layer (siblings share their input Cast)

    reference32 = zoo.logits(fp32, feeds).astype(np.float64)
    sqonnx.quantize(fp32, tmp_path / "int8-fp32.onnx", QuantizeConfig(calibration=calibration))
    fp32_loss = logits_error(tmp_path / "int8-fp32.onnx", reference32, feeds)
    assert logits_error(out, upcast, feeds) < 1.25 * fp32_loss + 2 * rounding


def test_bf16_model_in_bf16_out(tmp_path: Path, calibration: CalibrationConfig) -> None:
    """onnxruntime's CPU provider has no bfloat16 kernels, so a BF16 model runs here only upcast: sqonnx calibrates
    the upcast, and the written BF16 model, upcast the same way, is as close to the upcast original as the FP32
    model's INT8 output is to the FP32 model."""
    fp32 = zoo.build("llama")
    bf16 = to_bfloat16(fp32, tmp_path / "bf16" / "model.onnx")
    out = tmp_path / "int8" / "model.onnx"
    report = sqonnx.quantize(bf16, out, QuantizeConfig(calibration=calibration, verify_fusion=False))
    assert len(report.quantized_layers) == 15 and report.settings["rotation"].startswith("rotated")
    assert report.check is not None and not report.check.below_floor  # the written blocks run upcast for it
    onnx.checker.check_model(str(out))
    proto = onnx.load(str(out))
    assert proto.graph.output[0].type.tensor_type.elem_type == BFLOAT16
    kept = {t.data_type for t in proto.graph.initializer if t.name.startswith("model.") and len(t.dims)}
    assert kept == {BFLOAT16}, kept  # the embedding and norm weights stay bfloat16
    assert any(d in HALF_TYPES for d in (ir.DataType(t.data_type) for t in proto.graph.initializer))
    feeds = zoo.feeds(fp32, 2, 32, seed=7)
    upcast = zoo.logits(upcast_copy(bf16, tmp_path / "bf16-upcast.onnx"), feeds).astype(np.float64)
    reference32 = zoo.logits(fp32, feeds).astype(np.float64)
    sqonnx.quantize(fp32, tmp_path / "int8-fp32.onnx", QuantizeConfig(calibration=calibration))
    fp32_loss = logits_error(tmp_path / "int8-fp32.onnx", reference32, feeds)
    assert logits_error(upcast_copy(out, tmp_path / "int8-upcast.onnx"), upcast, feeds) < 1.5 * fp32_loss
