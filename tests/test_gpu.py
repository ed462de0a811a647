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
from sqonnx.session import CPU, calibration_providers
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
