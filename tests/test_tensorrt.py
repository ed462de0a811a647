"""--target tensorrt: what TensorRT's ONNX parser takes (static int8 Q/DQ), proven by a static checker that
names the first node breaking one of its rules (TensorRT itself cannot run here)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import sqonnx
from sqonnx import CalibrationConfig, QuantizeConfig, Target
from sqonnx.config import STATIC_TARGET_BUDGET
from sqonnx.targets.tensorrt import violation
from tests.child import run_sqonnx

INT8_ZERO = np.zeros((), np.int8)


def _qdq_graph(*, zero: np.ndarray | None = INT8_ZERO, scale: float = 0.1,
               weight_dtype: type = np.int8, activation_scales: int = 1, extra: list | None = None,
               opset: int = 17) -> ir.Graph:
    """x -> Q -> DQ -> MatMul(DQ(int8 weight, per-channel)) with the given activation zero point and scale."""
    w = np.ones((4, 3), weight_dtype)
    inputs = ["x", "s", "z"] if zero is not None else ["x", "s"]
    nodes = [helper.make_node("QuantizeLinear", inputs, ["xq"], name="x_Q"),
             helper.make_node("DequantizeLinear", ["xq", *inputs[1:]], ["xd"], name="x_DQ"),
             helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], name="w_DQ", axis=1),
             helper.make_node("MatMul", ["xd", "wd"], ["y"], name="mm"), *(extra or [])]
    inits = [numpy_helper.from_array(np.full(activation_scales, scale, np.float32).reshape(
                 () if activation_scales == 1 else (activation_scales,)), "s"),
             numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.full(3, 0.05, np.float32), "ws"),
             numpy_helper.from_array(np.zeros(3, weight_dtype), "wz")]
    if zero is not None:
        inits.append(numpy_helper.from_array(zero, "z"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], inits)
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])).graph


@pytest.mark.parametrize(("options", "expected"), [
    ({}, None),
    ({"zero": None}, "x_Q (QuantizeLinear): no zero point: the quantized type defaults to uint8"),
    ({"zero": np.zeros((), np.uint8)}, "x_Q (QuantizeLinear): its zero point must be a constant int8"),
    ({"zero": np.full((), 3, np.int8)}, "x_Q (QuantizeLinear): its zero point must be 0"),
    ({"scale": -0.1}, "x_Q (QuantizeLinear): scales must be positive float constants"),
    ({"activation_scales": 4}, "x_Q (QuantizeLinear): an activation needs one scale per tensor"),
    ({"weight_dtype": np.uint8}, "w_DQ (DequantizeLinear): its zero point must be a constant int8"),
    ({"extra": [helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "qs", "qz"], name="dyn")]},
     "dyn: DynamicQuantizeLinear has no TensorRT importer"),
    ({"opset": 21}, "ai.onnx opset 21: TensorRT 10's parser reads up to 20"),
])
def test_checker_names_the_first_node_that_breaks_a_rule(options: dict, expected: str | None) -> None:
    graph = _qdq_graph(**options)
    found = violation(graph, options.get("opset", 17))
    assert (found is None) if expected is None else (found is not None and found.startswith(expected)), found


def test_checker_refuses_uint8_weight_codes() -> None:
    graph = _qdq_graph()
    weight = graph.initializers["w"]
    weight.const_value = ir.tensor(np.ones((4, 3), np.uint8), name="w")
    assert violation(graph, 17) == "w_DQ (DequantizeLinear): weight codes must be int8, not uint8"


@pytest.mark.zoo
def test_tensorrt_target_end_to_end(tmp_path: Path) -> None:
    """A zoo Llama for TensorRT: every group static (the ones the CPU build puts per-token too), layers float only
    where the keep-float search needs them for the default budget, the rest static int8 Q/DQ that the checker
    passes, in the saved file."""
    from models import zoo

    model = zoo.build("llama")
    feeds = zoo.feeds(model, 8, 32, seed=0)
    for feed in feeds:
        feed["input_ids"][0, 0] = 3  # massive first-token activations: what a static range cannot hold
    np.savez(tmp_path / "c.npz", **{k: np.stack([f[k] for f in feeds]) for k in feeds[0]})
    calibration = CalibrationConfig(data=tmp_path / "c.npz", num_samples=8)
    report = sqonnx.quantize(model, tmp_path / "trt.onnx", QuantizeConfig(target=Target.TENSORRT,
                                                                          calibration=calibration))
    chosen = [t for t in report.settings["keep_float"] if t["chosen"]]
    assert len(chosen) == 1 and chosen[0]["quality_loss"] <= STATIC_TARGET_BUDGET
    floated = set(chosen[0]["float_layers"])
    assert floated == {layer.name for layer in report.layers if not layer.quantized}
    assert {layer.level for layer in report.layers if layer.quantized} == {"O3"}
    assert "all pass" in report.settings["tensorrt"]
    saved = ir.load(tmp_path / "trt.onnx")
    assert violation(saved.graph, 17) is None
    ops = {node.op_type for node in saved.graph}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops and not ops & {"MatMulInteger", "DynamicQuantizeLinear"}
    assert report.settings["weight_range"].startswith("full (8-bit)")


@pytest.mark.parametrize(("flags", "message"), [
    (["--weights", "int4"], "--weights int4 writes MatMulNBits, which TensorRT cannot import"),
    (["--dynamic"], "--target tensorrt takes static Q/DQ only; drop --dynamic/--level"),
    (["--format", "qoperator"], "--target tensorrt takes static Q/DQ only; drop --format qoperator"),
])
def test_tensorrt_flag_errors(tmp_path: Path, flags: list[str], message: str) -> None:
    x = np.random.default_rng(0).standard_normal((4, 1, 8, 4)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 3])],
                              [numpy_helper.from_array(np.ones((4, 3), np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "f.npz", x=x)
    done = run_sqonnx("quantize", tmp_path / "m.onnx", "-o", tmp_path / "q.onnx", "--calib-data", tmp_path / "f.npz",
                      "--num-samples", "4", "--target", "tensorrt", *flags)
    assert done.returncode == 2 and message in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "q.onnx").exists()


@pytest.mark.parametrize("target", [Target.TENSORRT, Target.CUDA])
def test_massive_tokens_static_or_float_by_the_budget(tmp_path: Path, target: Target) -> None:
    """A layer whose input has a few massive tokens gets per-token activations on the CPU (--level auto); TensorRT
    and onnxruntime's CUDA provider have no such form. There the layer is tried static, and stays float because
    static INT8 costs more than the default budget, named in the report; --static writes it static anyway."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((32, 8)).astype(np.float32)
    w[5] *= 1e-3  # read through a small weight row: the output stays ordinary
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
                               helper.make_node("MatMul", ["x2", "w2"], ["y2"], name="ordinary")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 32]),
                               helper.make_tensor_value_info("x2", TensorProto.FLOAT, [1, 16, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 8]),
                               helper.make_tensor_value_info("y2", TensorProto.FLOAT, [1, 16, 8])],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(w.copy(), "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "m.onnx")
    x = rng.standard_normal((8, 1, 16, 32)).astype(np.float32)
    x2 = x.copy()
    x[:, :, 0, 5] *= 1000  # a massive activation: the first token of every sample, in one channel
    np.savez(tmp_path / "f.npz", x=x, x2=x2)
    calibration = CalibrationConfig(data=tmp_path / "f.npz", num_samples=8)
    cpu = sqonnx.quantize(tmp_path / "m.onnx", tmp_path / "cpu.onnx", QuantizeConfig(calibration=calibration,
                                                                                       smooth=False))
    assert [(layer.quantized, layer.level) for layer in cpu.layers] == [(True, "O1"), (True, "O3")]
    report = sqonnx.quantize(tmp_path / "m.onnx", tmp_path / "gpu.onnx", QuantizeConfig(
        calibration=calibration, target=target, smooth=False))
    trials = report.settings["keep_float"]
    assert [t["float_layers"] for t in trials] == [[], ["mm"]] and trials[0]["quality_loss"] > STATIC_TARGET_BUDGET
    assert [layer.quantized for layer in report.layers] == [False, True]
    line = report.settings["tensorrt" if target is Target.TENSORRT else "cuda"]
    assert line.endswith("1 layers kept float (INT8 there costs more than the budget, quality loss 0.03): mm"), line
    assert next(n for n in onnx.load(str(tmp_path / "gpu.onnx")).graph.node if n.name == "mm").input[1] == "w"
    static = sqonnx.quantize(tmp_path / "m.onnx", tmp_path / "static.onnx", QuantizeConfig(
        calibration=calibration, target=target, smooth=False, per_token_where_needed=False, allow_lossy=True))
    assert all(layer.quantized for layer in static.layers) and "keep_float" not in static.settings
