"""FP16 and BF16 models for the GPU targets: quantized in their own type, no float32 islands where the runtime takes
half Q/DQ (TensorRT: float16 and bfloat16; onnxruntime's CUDA provider: float16), the opset moved into the target's
window (19 for half Q/DQ, TensorRT's 20 at most) by relabelling, and numbers as close to the FP model as the FP32
model's INT8 is. onnxruntime's CPU has no bfloat16 kernels: BF16 numbers are those of the upcast model."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import sqonnx
from models import zoo
from sqonnx import CalibrationConfig, QuantizeConfig, SqonnxError, Target
from sqonnx.passes.opset import SetOpsetPass
from sqonnx.targets.tensorrt import violation
from tests.test_half import logits_error, to_bfloat16, upcast_copy

pytestmark = pytest.mark.zoo

FLOAT, FLOAT16, BFLOAT16 = TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16


@pytest.fixture(scope="module")
def calibration(tmp_path_factory: pytest.TempPathFactory) -> CalibrationConfig:
    folder = tmp_path_factory.mktemp("calibration")
    return CalibrationConfig(data=zoo.save_npz(zoo.build("llama"), folder / "c.npz", samples=8, seq=32, seed=0),
                             num_samples=8)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    fp32 = zoo.build("llama")
    folder = tmp_path_factory.mktemp("bf16")
    shutil.copy(fp32.parent / "config.json", folder)
    return {"float32": fp32, "float16": zoo.build("llama", "float16"),
            "bfloat16": to_bfloat16(fp32, folder / "model.onnx")}


@pytest.fixture(scope="module")
def fp32_int8_error(models: dict[str, Path], calibration: CalibrationConfig,
                    tmp_path_factory: pytest.TempPathFactory) -> float:
    """What INT8 costs the FP32 model for the same target, the yardstick of the half models'."""
    out = tmp_path_factory.mktemp("fp32") / "q.onnx"
    sqonnx.quantize(models["float32"], out, QuantizeConfig(calibration=calibration, target=Target.TENSORRT))
    feeds = zoo.feeds(models["float32"], 2, 32, seed=7)
    return logits_error(out, zoo.logits(models["float32"], feeds).astype(np.float64), feeds)


def _types(graph: onnx.GraphProto) -> dict[str, int]:
    """Every value's element type: initializers, inputs, outputs and what shape inference finds."""
    found = {i.name: i.data_type for i in graph.initializer}
    for info in (*graph.input, *graph.output, *graph.value_info):
        found[info.name] = info.type.tensor_type.elem_type
    return found


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("target", [Target.TENSORRT, Target.CUDA])
def test_half_model_quantized_in_its_own_type(tmp_path: Path, models: dict[str, Path], calibration: CalibrationConfig,
                                              fp32_int8_error: float, target: Target, dtype: str) -> None:
    half = FLOAT16 if dtype == "float16" else BFLOAT16
    out = tmp_path / "q" / "model.onnx"
    report = sqonnx.quantize(models[dtype], out, QuantizeConfig(calibration=calibration, target=target,
                                                                verify_fusion=False))
    assert len(report.quantized_layers) == 15
    onnx.checker.check_model(str(out))
    proto = onnx.shape_inference.infer_shapes(onnx.load(str(out)))
    graph = proto.graph
    assert graph.output[0].type.tensor_type.elem_type == half
    types = _types(graph)
    producers = {output: node for node in graph.node for output in node.output}
    quantizes = [n for n in graph.node if n.op_type == "QuantizeLinear"]
    native = target is Target.TENSORRT or dtype == "float16"  # CUDA's QuantizeLinear has no bfloat16 kernel
    opset = proto.opset_import[0].version
    islands = [n.name for n in graph.node if n.name.endswith("/input_Cast")]
    if native:
        assert opset == 19  # Q/DQ took half types in 19; the zoo's export is 18
        assert not islands
        for node in quantizes:  # half in, half scale: nothing float32 before the quantization
            assert types[node.input[0]] == half and types[node.input[1]] == half, node.name
            producer = producers.get(node.input[0])
            assert producer is None or producer.op_type != "Cast", node.name
    else:
        assert opset == 18 and len(islands) >= 7
        assert {types[n.input[1]] for n in quantizes} == {FLOAT}
    if target is Target.TENSORRT:
        assert violation(ir.load(out).graph, opset) is None and "all pass" in report.settings["tensorrt"]
        dequantizes = [n for n in graph.node if n.op_type == "DequantizeLinear"]
        assert len(dequantizes) == 30 and {types[n.input[1]] for n in dequantizes} == {half}
        readers = Counter(n.op_type for n in graph.node if set(n.input) & {d.output[0] for d in dequantizes})
        assert readers == {"MatMul": 15}
        for node in graph.node:  # each layer: both operands and its output in the model's type
            if node.op_type == "MatMul" and producers.get(node.input[1], node).op_type == "DequantizeLinear":
                assert {types[node.input[0]], types[node.input[1]], types[node.output[0]]} == {half}, node.name
    else:  # int32 sums to float32 for the rescale (they pass float16's range), then the model's type
        matmuls = [n for n in graph.node if n.op_type == "MatMulInteger"]
        assert len(matmuls) == 15
        assert Counter(n.op_type for n in graph.node if n.name.endswith("/output_Cast")) == {"Cast": 15}
        assert not {n.op_type for n in graph.node} & {"DequantizeLinear", "DynamicQuantizeLinear"}
    feeds = zoo.feeds(models["float32"], 2, 32, seed=7)
    source = upcast_copy(models[dtype], tmp_path / "source-upcast.onnx")
    upcast = zoo.logits(source, feeds).astype(np.float64)
    error = logits_error(upcast_copy(out, tmp_path / "q-upcast.onnx") if dtype == "bfloat16" else out, upcast, feeds)
    rounding = 2e-3 if dtype == "float16" else 1e-2  # the half type's own rounding of the folded weights
    assert error < 1.5 * fp32_int8_error + rounding, (error, fp32_int8_error)


def test_genai_graph_moves_into_tensorrts_opset(tmp_path: Path) -> None:
    """onnxruntime-genai's builder writes opset 21, one past TensorRT 10's parser: the graph is relabelled to 20
    (nothing it uses changed meaning), quantized and checked; the CUDA target takes 21 as it is."""
    from tests.test_genai import CALIBRATION, build_genai

    model = build_genai(tmp_path / "genai", layers=1)
    for target, opset in ((Target.TENSORRT, 20), (Target.CUDA, 21)):
        out = tmp_path / target.value / "model.onnx"
        report = sqonnx.quantize(model, out, QuantizeConfig(calibration=CALIBRATION, target=target,
                                                            verify_fusion=False))
        proto = onnx.load(str(out))
        assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [opset]
        onnx.checker.check_model(proto)
        assert report.quantized_layers
        if target is Target.TENSORRT:
            assert violation(ir.load(out).graph, opset) is None


def _reduce_model(opset: int, extra: list | None = None) -> ir.Model:
    nodes = [helper.make_node("ReduceMean", ["x"], ["m"], name="mean", axes=[-1], keepdims=1),
             helper.make_node("ReduceMax", ["x"], ["y"], name="max", keepdims=0),
             helper.make_node("Add", ["m", "m"], ["z"], name="add"), *(extra or [])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", FLOAT, [2, 3, 4])],
                              [helper.make_tensor_value_info("y", FLOAT, []),
                               helper.make_tensor_value_info("z", FLOAT, [2, 3, 1])],
                              [numpy_helper.from_array(np.zeros(2, np.float32), "unused")])
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]))


def test_relabelling_past_opset_18_moves_reduce_axes_to_an_input() -> None:
    import onnxruntime as ort

    model = _reduce_model(17)
    x = np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32)

    def run(m: ir.Model) -> list[np.ndarray]:
        proto = ir.serde.serialize_model(m)
        onnx.checker.check_model(proto, full_check=True)
        return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})

    before = run(model)
    assert SetOpsetPass(19, "test")(model).modified
    mean = next(n for n in model.graph if n.name == "mean")
    assert "axes" not in mean.attributes and mean.inputs[1] is not None
    assert mean.inputs[1].producer().attributes["value"].as_tensor().numpy().tolist() == [-1]
    after = run(model)
    assert all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))


def test_relabelling_past_opset_18_names_an_equal_splits_output_count() -> None:
    import onnxruntime as ort

    split = helper.make_node("Split", ["x"], ["a", "b"], name="halves", axis=-1)
    graph = helper.make_graph([split], "g", [helper.make_tensor_value_info("x", FLOAT, [2, 4])],
                              [helper.make_tensor_value_info(n, FLOAT, [2, 2]) for n in ("a", "b")])
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    SetOpsetPass(19, "test")(model)
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto, full_check=True)
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    a, b = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    assert np.array_equal(a, x[:, :2]) and np.array_equal(b, x[:, 2:])


def test_relabelling_refuses_an_op_that_changed_meaning() -> None:
    grid = helper.make_node("GridSample", ["x4", "g4"], ["s4"], name="sampler")
    model = _reduce_model(17, [grid])
    with pytest.raises(SqonnxError, match=r"sampler \(GridSample\) changed meaning in opset 20: convert the model "
                                          r"with onnx.version_converter.convert_version\(model, 20\) first"):
        SetOpsetPass(20, "test")(model)
