"""A tied LM head (MatMul reading Transpose(embedding), OPT's optimum export) is quantized like any layer from
its own INT8 copy, the embedding Gather keeps reading the exact float table, and an excluded head reads the
table through a Transpose again instead of adding a float copy to the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import sqonnx
from models import zoo
from sqonnx import CalibrationConfig, QuantizeConfig
from sqonnx.passes.transposed import FoldTransposedConstantsPass, RestoreTransposedCopiesPass

HEAD = "/lm_head/MatMul"


def _opt() -> Path:
    pytest.importorskip("optimum.exporters.onnx", reason="the zoo is exported with optimum-onnx (the `export` extra)")
    return zoo.build("opt")


def _tables(path: Path) -> dict[str, np.ndarray]:
    """2-D float initializers with a vocabulary-sized axis (tables), by name."""
    model = onnx.load(str(path))
    vocab = zoo._vocab_size(_opt())
    return {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer
            if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 2 and vocab in i.dims}


def _quantize(tmp_path: Path, name: str, **options: object) -> tuple[Path, sqonnx.QuantizeReport]:
    model = _opt()
    data = zoo.save_npz(model, tmp_path / "calib.npz", samples=4, seq=32, seed=0)
    out = tmp_path / f"{name}.onnx"
    config = QuantizeConfig(calibration=CalibrationConfig(data=data, num_samples=4), **options)  # type: ignore[arg-type]
    return out, sqonnx.quantize(model, out, config)


def test_tied_head_gets_its_own_int8_copy(tmp_path: Path) -> None:
    model = _opt()
    original = _tables(model)
    assert len(original) == 1  # one table, read by the embedding Gather and (transposed) by the head
    assert any(n.op_type == "Transpose" and n.input[0] in original for n in onnx.load(str(model)).graph.node)
    out, report = _quantize(tmp_path, "q")
    head = next(layer for layer in report.layers if layer.name == HEAD)
    assert head.quantized and head.smoothing == "LayerNormalization"
    assert report.kernels is not None and not report.kernels.unfused
    assert report.kernels.integer_total == len(report.layers) == zoo.constant_weight_layers(model)
    # The embedding table is still there, float and bit-identical; no float copy of it was added.
    saved = _tables(out)
    assert list(saved) == list(original) and np.array_equal(saved[next(iter(saved))], original[next(iter(original))])
    head_inputs = next(n for n in onnx.load(str(out)).graph.node if n.name.startswith(HEAD)).input
    assert not set(head_inputs) & set(saved)


@pytest.mark.parametrize("options", [{"exclude": ("*lm_head*",)}, {"smooth_only": True}],
                         ids=["excluded", "smooth-only"])
def test_float_head_reads_the_table_transposed_again(tmp_path: Path, options: dict) -> None:
    """An excluded head is not quantized: its copy would be one more vocab x hidden float table in the file.
    (Smoothing-only folds the final norm into the head, which then differs from the table: it stays a copy.)"""
    model = _opt()
    out, report = _quantize(tmp_path, "float-head", **options)
    saved = _tables(out)
    transposes = [n for n in onnx.load(str(out)).graph.node if n.op_type == "Transpose" and n.input[0] in saved]
    if options.get("smooth_only"):
        assert len(saved) == 2 and not transposes
        assert next(layer for layer in report.layers if layer.name == HEAD).smoothing == "LayerNormalization"
    else:
        assert list(saved) == list(_tables(model)) and len(transposes) == 1  # the original table, as exported
        head = next(n for n in onnx.load(str(out)).graph.node if n.name == HEAD)
        assert head.input[1] == transposes[0].output[0]
        assert out.stat().st_size < model.stat().st_size


def _two_heads_one_table() -> ir.Model:
    """One table read by a Gather and, transposed twice, by two MatMuls; a third Transpose is a model output."""
    table = np.arange(12, dtype=np.float32).reshape(4, 3)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["E", "ids"], ["h"]),
         helper.make_node("Transpose", ["E"], ["Et1"], perm=[1, 0]),
         helper.make_node("Transpose", ["E"], ["Et2"], perm=[1, 0]),
         helper.make_node("Transpose", ["E"], ["Et_out"], perm=[1, 0]),
         helper.make_node("MatMul", ["h", "Et1"], ["y1"]), helper.make_node("MatMul", ["h", "Et2"], ["y2"])],
        "tied", [helper.make_tensor_value_info("ids", TensorProto.INT64, [2])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in ("y1", "y2", "Et_out")],
        [numpy_helper.from_array(table, "E")])
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def test_fold_and_restore_are_exact_inverses() -> None:
    model = _two_heads_one_table()
    assert FoldTransposedConstantsPass()(model).modified
    ops = [node.op_type for node in model.graph]
    assert ops.count("Transpose") == 1  # the one whose output is a model output stays
    copies = [v for name, v in model.graph.initializers.items() if name != "E"]
    assert len(copies) == 2 and all(np.array_equal(v.const_value.numpy(), np.arange(12.0).reshape(4, 3).T)
                                    for v in copies)
    assert not FoldTransposedConstantsPass()(model).modified
    assert RestoreTransposedCopiesPass()(model).modified
    assert list(model.graph.initializers) == ["E"]
    transposes = [node for node in model.graph if node.op_type == "Transpose"]
    assert len(transposes) == 3 and all(node.inputs[0] is model.graph.initializers["E"] for node in transposes)
    assert not RestoreTransposedCopiesPass()(model).modified


def test_changed_copy_is_not_restored() -> None:
    model = _two_heads_one_table()
    FoldTransposedConstantsPass()(model)
    changed = next(v for name, v in model.graph.initializers.items() if name != "E")
    changed.const_value = ir.tensor(changed.const_value.numpy() * 2, name=changed.name)
    RestoreTransposedCopiesPass()(model)
    assert changed.name in model.graph.initializers and len(model.graph.initializers) == 2
