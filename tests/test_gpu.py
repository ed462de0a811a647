"""--calibration-provider: CUDA when onnxruntime-gpu sees a GPU, else the CPU with one line. No test needs a GPU:
the one that compares CUDA statistics with the CPU's skips without one."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

import sqonnx
from sqonnx import CalibrationConfig, Provider, QuantizeConfig
from sqonnx.runtime.session import CPU, calibration_providers
from tests.test_int4 import _linear, _outlier_model

HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()


def test_provider_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert calibration_providers("auto") == (CPU, "") and calibration_providers("cpu") == (CPU, "")
    providers, note = calibration_providers("cuda")
    assert providers == CPU and note.startswith("--calibration-provider cuda: this onnxruntime has no CUDA provider")
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    providers, note = calibration_providers("auto")
    assert providers[0] == ("CUDAExecutionProvider", {"use_tf32": "0"}) and note == ""
    assert calibration_providers("cpu") == (CPU, "")


@pytest.mark.skipif(HAS_CUDA, reason="checks the fallback of a machine without CUDA")
def test_cuda_requested_without_one_is_one_warning_and_the_cpu(tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    path, feeds = _outlier_model(tmp_path, 1.0)
    calibration = CalibrationConfig(data=feeds, num_samples=16)
    sqonnx.quantize(path, tmp_path / "cpu.onnx", QuantizeConfig(calibration=calibration))
    with caplog.at_level(logging.WARNING):
        sqonnx.quantize(path, tmp_path / "cuda.onnx", QuantizeConfig(calibration=calibration,
                                                                      calibration_provider=Provider.CUDA))
    assert [r.message for r in caplog.records].count(calibration_providers("cuda")[1]) == 1
    assert (tmp_path / "cpu.onnx").read_bytes() == (tmp_path / "cuda.onnx").read_bytes()


@pytest.mark.skipif(not HAS_CUDA, reason="needs onnxruntime-gpu and an NVIDIA GPU")
def test_cuda_statistics_equal_the_cpus(tmp_path: Path) -> None:
    from sqonnx.calibrators.channel_max import StatisticsSession

    path, _, _ = _linear(tmp_path / "m.onnx", 256, 64, False, np.random.default_rng(0))
    x = np.random.default_rng(1).standard_normal((4, 1, 64, 256)).astype(np.float32)
    found = []
    for providers in (CPU, calibration_providers("cuda")[0]):
        session = StatisticsSession(ir.load(path), {"x": 256}, gram=True, providers=providers)
        for index, sample in enumerate(x):
            session.run({"x": sample}, sample=index)
        found.append(session.statistics())
    np.testing.assert_allclose(found[1].channel_max["x"], found[0].channel_max["x"], rtol=1e-3)
    np.testing.assert_allclose(found[1].hessians["x"], found[0].hessians["x"], rtol=1e-3, atol=1e-3)


@pytest.mark.zoo
def test_cuda_target_form(tmp_path: Path) -> None:
    """--target cuda: every quantized layer is int8 QuantizeLinear -> MatMulInteger (int8 x int8, what onnxruntime's
    CUDA MatMulInteger takes) -> Cast -> Mul, nothing without a CUDA kernel (DynamicQuantizeLinear, uint8, fused
    contrib ops); the groups the CPU build puts per-token (if any) stay float; the numbers are the CPU's (run
    here)."""
    import onnx

    from models import zoo

    model = zoo.build("llama")
    feeds = zoo.feeds(model, 8, 32, seed=0)
    for feed in feeds:
        feed["input_ids"][0, 0] = 3  # massive first-token activations: per-token groups on the CPU
    np.savez(tmp_path / "c.npz", **{k: np.stack([f[k] for f in feeds]) for k in feeds[0]})
    calibration = CalibrationConfig(data=tmp_path / "c.npz", num_samples=8)
    cpu = sqonnx.quantize(model, tmp_path / "cpu.onnx", QuantizeConfig(calibration=calibration))
    report = sqonnx.quantize(model, tmp_path / "cuda.onnx", QuantizeConfig(calibration=calibration,
                                                                            target=sqonnx.Target.CUDA))
    per_token = {layer.name for layer in cpu.layers if layer.quantized and layer.level == "O1"}
    floated = {layer.name for layer in report.layers if layer.level_reason.startswith("float: needs per-token")}
    quantized = [layer for layer in report.layers if layer.quantized]
    assert floated == per_token and quantized
    graph = onnx.load(str(tmp_path / "cuda.onnx")).graph
    ops = [node.op_type for node in graph.node]
    assert ops.count("MatMulInteger") == len(quantized) and not {"DynamicQuantizeLinear", "MatMulIntegerToFloat",
                                                                  "DequantizeLinear"} & set(ops)
    inits = {i.name: i for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "QuantizeLinear":
            assert inits[node.input[2]].data_type == onnx.TensorProto.INT8
        if node.op_type == "MatMulInteger":
            assert inits[node.input[1]].data_type == onnx.TensorProto.INT8
    assert report.settings["cuda"].startswith(f"{len(quantized)} layers as int8 QuantizeLinear -> MatMulInteger")
    held = zoo.feeds(model, 2, 32, seed=7)
    reference = zoo.logits(model, held)
    error = float(np.linalg.norm(zoo.logits(tmp_path / "cuda.onnx", held) - reference) / np.linalg.norm(reference))
    assert error < 0.1, error
