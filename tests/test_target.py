"""No silent saturation: the weight range follows the target, the saved model proves it fits int16, and a
numpy model of the x86 u8 x s8 kernel shows what goes wrong with full-range weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import sqonnx
from sqonnx import CalibrationConfig, QuantizeConfig, SqonnxError, Target
from sqonnx.targets import cpu as target_module
from sqonnx.targets.cpu import INT16_MAX, cpu_flags, detect_native, worst_int16_pair


def vpmaddubsw_matmul(a_u8: np.ndarray, w_s8: np.ndarray) -> np.ndarray:
    """u8 [M, K] x s8 [K, N] as AVX2 without VNNI computes it: adjacent products summed into a
    saturating int16, then widened and accumulated in int32."""
    a = a_u8.astype(np.int32)
    w = w_s8.astype(np.int32)
    if a.shape[1] % 2:
        a, w = np.pad(a, ((0, 0), (0, 1))), np.pad(w, ((0, 1), (0, 0)))
    pairs = a[:, 0::2, None] * w[None, 0::2] + a[:, 1::2, None] * w[None, 1::2]
    return np.clip(pairs, -INT16_MAX - 1, INT16_MAX).sum(axis=1)


def test_detect_native() -> None:
    assert detect_native("x86_64", {"avx2", "fma"}) is Target.X86_AVX2
    assert detect_native("x86_64", {"avx2", "avx512f"}) is Target.X86_AVX2  # AVX-512 without VNNI saturates too
    assert detect_native("x86_64", {"avx2", "avx512_vnni"}) is Target.X86_VNNI
    assert detect_native("x86_64", {"avx2", "avx_vnni"}) is Target.X86_VNNI
    assert detect_native("aarch64", set()) is Target.ARM64
    assert detect_native("riscv64", set()) is Target.PORTABLE


def test_cpu_flags_reads_cpuinfo(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512_vnni\n\nprocessor\t: 1\n")
    assert cpu_flags(cpuinfo) == {"fpu", "sse2", "avx2", "avx512_vnni"}
    assert cpu_flags(tmp_path / "missing") == set()


def test_worst_pair() -> None:
    assert worst_int16_pair(np.full((4, 3), 127, np.int8), in_axis=0) == 254 * 255 > INT16_MAX
    assert worst_int16_pair(np.full((4, 3), -63, np.int8), in_axis=0) == 126 * 255 <= INT16_MAX
    assert worst_int16_pair(np.full((3, 5), 63, np.int8), in_axis=1) == 126 * 255  # [out, in] layout, odd K


@pytest.mark.parametrize(("target", "flags", "reduced"), [
    (Target.PORTABLE, None, True), (Target.X86_AVX2, None, True), (Target.X86_VNNI, None, False),
    (Target.ARM64, None, False), (Target.GPU, None, False),
    (Target.NATIVE, {"avx2"}, True), (Target.NATIVE, {"avx2", "avx512_vnni"}, False)])
def test_range_follows_target(monkeypatch: pytest.MonkeyPatch, target: Target, flags: set[str] | None,
                              reduced: bool) -> None:
    monkeypatch.setattr(target_module.platform, "machine", lambda: "x86_64")
    if flags is not None:
        monkeypatch.setattr(target_module, "cpu_flags", lambda: flags)
    config = QuantizeConfig(target=target)
    assert config.reduced_range is reduced
    assert config.weight_qmax == (63 if reduced else 127)


def test_full_range_refused_where_it_saturates() -> None:
    with pytest.raises(SqonnxError, match="--full-range saturates"):
        QuantizeConfig(reduce_range=False)
    with pytest.raises(SqonnxError, match="--full-range saturates"):
        QuantizeConfig(reduce_range=False, target=Target.X86_AVX2)
    assert QuantizeConfig(reduce_range=False, target=Target.GPU).weight_qmax == 127
    assert QuantizeConfig(reduce_range=True, target=Target.GPU).weight_qmax == 63  # asking for safety is fine


def saved_weight_codes(path: Path) -> list[np.ndarray]:
    proto = onnx.load(str(path))
    return [numpy_helper.to_array(t) for t in proto.graph.initializer
            if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 2]


@pytest.mark.parametrize(("target", "saturates"), [(Target.PORTABLE, False), (Target.GPU, True)])
def test_saved_model_against_the_avx2_kernel(tmp_path: Path, block: Path, feeds: Path, target: Target,
                                             saturates: bool) -> None:
    """The worst-case u8 activations (255 where a weight is positive, 0 elsewhere, so products never
    cancel) hit int16 saturation only with full-range weights, and the metadata says which case it is."""
    out = tmp_path / "q.onnx"
    report = sqonnx.quantize(block, out, QuantizeConfig(target=target,
                                                        calibration=CalibrationConfig(data=feeds, num_samples=4)))
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["sqonnx.target"] == target.value
    assert ("exceeds" in meta["sqonnx.int16_worst_case"]) is saturates
    assert report.settings["int16_worst_case"] == meta["sqonnx.int16_worst_case"]
    codes = saved_weight_codes(out)
    assert len(codes) == 7
    clipped = 0
    for w in codes:
        worst_a = np.where(w.T > 0, 255, 0).astype(np.uint8)  # one activation row per output column
        exact = worst_a.astype(np.int32) @ w.astype(np.int32)
        clipped += int((vpmaddubsw_matmul(worst_a, w) != exact).sum())
    assert (clipped > 0) is saturates


def test_every_target_is_one_row_of_rules() -> None:
    """The registry holds one row per target (native aside: it resolves to a CPU row), and what depends on the target
    reads the row: the weight range, the static-only forms, the opset limit, the graph validator."""
    from sqonnx.targets import REGISTRY, rules_of

    assert set(REGISTRY) == set(Target) - {Target.NATIVE}
    assert rules_of(Target.NATIVE) in (REGISTRY[Target.X86_AVX2], REGISTRY[Target.X86_VNNI], REGISTRY[Target.ARM64],
                                       REGISTRY[Target.PORTABLE])
    assert [t.value for t, row in REGISTRY.items() if row.full_range] == ["x86-vnni", "arm64", "gpu", "tensorrt",
                                                                           "cuda"]
    assert [t.value for t, row in REGISTRY.items() if row.static_only] == ["tensorrt", "cuda"]
    assert REGISTRY[Target.TENSORRT].violation is not None and REGISTRY[Target.CUDA].violation is None
    assert (REGISTRY[Target.TENSORRT].max_opset, REGISTRY[Target.CUDA].max_opset) == (20, 21)
    with pytest.raises(sqonnx.SqonnxError, match="which TensorRT cannot import; drop --weights int4 for --target "
                                                 "tensorrt"):
        sqonnx.QuantizeConfig(target=Target.TENSORRT, weights=sqonnx.Weights.INT4)
    with pytest.raises(sqonnx.SqonnxError, match=r"--target cuda writes static int8 activations \(onnxruntime's CUDA "
                                                 "provider has no DynamicQuantizeLinear\\)"):
        sqonnx.QuantizeConfig(target=Target.CUDA, level=sqonnx.Level.O2)
    cuda = sqonnx.QuantizeConfig(target=Target.CUDA)
    assert cuda.integer_form and cuda.weight_qmax == 127
