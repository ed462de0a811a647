"""Every way onnxruntime users hold a model and calibration data reaches the same bytes: the CLI with an .npz, the
API with a path, an onnxruntime CalibrationDataReader, a list or a generator of feed dicts, an in-memory
ModelProto, and `sqonnx.compat.quantize_static` called by a script written as onnxruntime's documented static
quantization example is (its import changed, nothing else). Bad input through the new routes is one line."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType

import sqonnx
from models import zoo
from sqonnx import CalibrationConfig, QuantizeConfig, SqonnxError
from sqonnx.compat import quantize_static
from tests.child import run_sqonnx

pytestmark = pytest.mark.zoo

STATIC_PER_TENSOR = QuantizeConfig(per_token_where_needed=False, per_channel=False)  # what quantize_static means


class FeedsReader(CalibrationDataReader):
    """onnxruntime's reader protocol: get_next() gives one feed dict, then None."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self.items = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.items, None)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[dict[str, np.ndarray]]]:
    folder = tmp_path_factory.mktemp("routes")
    model = zoo.build("llama")
    feeds = zoo.feeds(model, 8, 32, seed=0)
    path = folder / "feeds.npz"
    np.savez(path, **{name: np.stack([feed[name] for feed in feeds]) for name in feeds[0]})
    return model, path, feeds


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_every_route_writes_the_same_bytes(tmp_path: Path, inputs: tuple[Path, Path, list[dict]]) -> None:
    model, npz, feeds = inputs
    done = run_sqonnx("quantize", model, "-o", tmp_path / "cli" / "model.onnx", "--calib-data", npz, "--static",
                      "--per-tensor")
    assert done.returncode == 0, done.stderr
    routes = {
        "path": npz,
        "reader": FeedsReader(feeds),
        "list": feeds,
        "generator": (feed for feed in feeds),
    }
    for name, calibration in routes.items():
        sqonnx.quantize(model, tmp_path / name / "model.onnx", STATIC_PER_TENSOR, calibration=calibration)
    sqonnx.quantize(onnx.load(str(model)), tmp_path / "proto" / "model.onnx", STATIC_PER_TENSOR,
                    calibration=FeedsReader(feeds))
    quantize_static(str(model), str(tmp_path / "compat" / "model.onnx"), FeedsReader(feeds),
                    extra_options={"SmoothQuant": True, "SmoothQuantAlpha": 0.5})
    expected = _files(tmp_path / "cli")
    assert "model.onnx" in expected
    for name in (*routes, "proto", "compat"):
        assert _files(tmp_path / name) == expected, name


ORT_EXAMPLE = '''
    # onnxruntime's static quantization example (onnxruntime-inference-examples, quantization/image_classification/
    # cpu/run.py) as a user adapts it to a language model, with onnxruntime's SmoothQuant option; only the import of
    # quantize_static differs
    import sys

    import numpy as np
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType
    from sqonnx.compat import quantize_static


    class DataReader(CalibrationDataReader):
        def __init__(self, calibration_file):
            data = np.load(calibration_file)
            self.enum_data = iter([{name: data[name][i] for name in data.files} for i in range(len(data["input_ids"]))])

        def get_next(self):
            return next(self.enum_data, None)


    input_model_path, output_model_path, calibration_file = sys.argv[1:4]
    dr = DataReader(calibration_file)
    quantize_static(
        input_model_path,
        output_model_path,
        dr,
        quant_format=QuantFormat.QDQ,
        per_channel=False,
        weight_type=QuantType.QInt8,
        extra_options={"SmoothQuant": True, "SmoothQuantAlpha": 0.5, "SmoothQuantFolding": True},
    )
    print("Calibrated and quantized model saved.")
'''


def test_onnxruntime_example_script_runs_with_one_import_changed(tmp_path: Path,
                                                                 inputs: tuple[Path, Path, list[dict]]) -> None:
    model, npz, _ = inputs
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(ORT_EXAMPLE))
    done = subprocess.run([sys.executable, str(script), str(model), str(tmp_path / "ort" / "model.onnx"), str(npz)],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=600,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "Calibrated and quantized model saved."
    sqonnx.quantize(model, tmp_path / "api" / "model.onnx", STATIC_PER_TENSOR, calibration=npz)
    assert _files(tmp_path / "ort") == _files(tmp_path / "api")
    ops = {node.op_type for node in onnx.load(str(tmp_path / "ort" / "model.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops


def test_compat_maps_options_and_refuses_the_rest_by_name(tmp_path: Path,
                                                           inputs: tuple[Path, Path, list[dict]]) -> None:
    model, _, feeds = inputs
    with pytest.raises(SqonnxError) as refused:
        quantize_static(str(model), str(tmp_path / "q.onnx"), FeedsReader(feeds), activation_type=QuantType.QInt16,
                        op_types_to_quantize=["MatMul", "Conv"],
                        extra_options={"SmoothQuant": True, "SmoothQuantFolding": False, "CalibMovingAverage": True})
    message = str(refused.value)
    assert "\n" not in message and message.startswith("sqonnx.compat.quantize_static cannot map ")
    for part in ("extra_options['SmoothQuantFolding']=False (sqonnx folds 1/s", "extra_options['CalibMovingAverage']",
                 "op_types_to_quantize ['Conv']", "activation_type QInt16"):
        assert part in message, part
    assert not (tmp_path / "q.onnx").exists()
    report = quantize_static(str(model), str(tmp_path / "op" / "model.onnx"), FeedsReader(feeds),
                             quant_format=QuantFormat.QOperator, per_channel=True, reduce_range=True,
                             nodes_to_exclude=["/lm_head/MatMul"], extra_options={"SmoothQuant": True})
    settings = report.settings
    assert settings["format"] == "qoperator" and settings["weight_range"].startswith("reduced")
    assert [layer.name for layer in report.layers if not layer.quantized] == ["/lm_head/MatMul"]


def test_compat_op_types_leave_the_other_layers_float(tmp_path: Path) -> None:
    """GPT-2's Conv1D layers are Gemm: op_types_to_quantize=["MatMul"] leaves them float, as onnxruntime would."""
    model = zoo.build("gpt2")
    feeds = zoo.feeds(model, 4, 16, seed=0)
    report = quantize_static(str(model), str(tmp_path / "q.onnx"), FeedsReader(feeds), op_types_to_quantize=["MatMul"],
                             extra_options={"SmoothQuant": True})
    gemms = {layer.name for layer in report.layers if "Gemm" in layer.name}
    assert gemms and not any(layer.quantized for layer in report.layers if layer.name in gemms)
    assert any(layer.quantized for layer in report.layers if layer.name not in gemms)


@pytest.mark.parametrize(("calibration", "message"), [
    ([{"input_ids": np.zeros((1, 8), np.int64)}, {"input_ids": np.zeros((1, 9), np.int64)}],
     "input 'input_ids' of calibration sample 1 from the calibration iterable is int64 [1, 9], sample 0's is int64 "
     "[1, 8]; sqonnx stacks the samples: give every sample one shape"),
    ([{"input_ids": np.zeros((1, 8), np.int64)}, [1, 2]],
     "calibration sample 1 from the calibration iterable is a list, not a dict of input name -> array"),
    ([], "the calibration iterable gave no samples"),
    (42, "calibration must be a path, several paths, an onnxruntime CalibrationDataReader or an iterable of feed "
         "dicts, not a int"),
])
def test_bad_calibration_sources_are_one_line(tmp_path: Path, inputs: tuple[Path, Path, list[dict]],
                                              calibration: object, message: str) -> None:
    model, _, _ = inputs
    with pytest.raises(SqonnxError) as refused:
        sqonnx.quantize(model, tmp_path / "q.onnx", calibration=calibration)
    assert str(refused.value).startswith(message) and "\n" not in str(refused.value)
    assert not (tmp_path / "q.onnx").exists()


def test_reader_samples_go_through_the_npz_checks(tmp_path: Path, inputs: tuple[Path, Path, list[dict]]) -> None:
    model, _, feeds = inputs
    wrong = [{**feed, "input_ids": feed["input_ids"].astype(np.int32)} for feed in feeds]
    with pytest.raises(SqonnxError, match=r"array 'input_ids' in FeedsReader.npz is int32; the model needs int64"):
        sqonnx.quantize(model, tmp_path / "q.onnx", calibration=FeedsReader(wrong))
    with pytest.raises(SqonnxError, match="calibration is given twice"):
        sqonnx.quantize(model, tmp_path / "q.onnx", QuantizeConfig(calibration=CalibrationConfig(data=Path("x.npz"))),
                        calibration=feeds)


def test_model_proto_without_its_data_is_one_line(tmp_path: Path, inputs: tuple[Path, Path, list[dict]]) -> None:
    model, _, feeds = inputs
    proto = onnx.load(str(model))
    onnx.save_model(proto, tmp_path / "ext.onnx", save_as_external_data=True, location="ext.onnx.data",
                    size_threshold=0)
    unloaded = onnx.load(str(tmp_path / "ext.onnx"), load_external_data=False)
    with pytest.raises(SqonnxError, match=r"the ModelProto's initializer .* keeps its data in ext.onnx.data, which "
                                          r"sqonnx cannot find without the model's folder: pass the model's path"):
        sqonnx.quantize(unloaded, tmp_path / "q.onnx", calibration=feeds)
    reader = FeedsReader(feeds)
    with pytest.raises(SqonnxError, match="a ModelProto has no file name to write beside: give output_path"):
        sqonnx.quantize(proto, calibration=reader)
    assert reader.get_next() is not None  # refused before the reader was read: it can be read once only
    with pytest.raises(SqonnxError, match="a ModelProto has no tokenizer beside it for text calibration: give "
                                          "calibration as feeds"):
        sqonnx.quantize(proto, tmp_path / "q.onnx")
