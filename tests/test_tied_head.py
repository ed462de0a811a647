"""A tied LM head (MatMul reading Transpose(embedding), OPT's optimum export) is quantized like any layer from
its own INT8 copy, the embedding Gather keeps reading the exact float table, and an excluded head reads the
table through a Transpose again instead of adding a float copy to the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

import sqonnx
from sqonnx import CalibrationConfig, QuantizeConfig
from tests import zoo

pytest.importorskip("optimum.exporters.onnx", reason="the zoo is exported with optimum-onnx (the `export` extra)")

HEAD = "/lm_head/MatMul"


def _tables(path: Path) -> dict[str, np.ndarray]:
    """2-D float initializers with a vocabulary-sized axis (tables), by name."""
    model = onnx.load(str(path))
    vocab = zoo._vocab_size(zoo.build("opt"))
    return {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer
            if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 2 and vocab in i.dims}


def _quantize(tmp_path: Path, name: str, **options: object) -> tuple[Path, sqonnx.QuantizeReport]:
    model = zoo.build("opt")
    data = zoo.save_npz(model, tmp_path / "calib.npz", samples=4, seq=32, seed=0)
    out = tmp_path / f"{name}.onnx"
    config = QuantizeConfig(calibration=CalibrationConfig(data=data, num_samples=4), **options)  # type: ignore[arg-type]
    return out, sqonnx.quantize(model, out, config)


def test_tied_head_gets_its_own_int8_copy(tmp_path: Path) -> None:
    model = zoo.build("opt")
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
    model = zoo.build("opt")
    out, report = _quantize(tmp_path, "float-head", **options)
    saved = _tables(out)
    transposes = [n for n in onnx.load(str(out)).graph.node if n.op_type == "Transpose" and n.input[0] in saved]
    if options.get("smooth_only"):
        assert len(saved) == 2 and not transposes
        assert next(layer for layer in report.layers if layer.name == HEAD).smoothing == "LayerNormalization"
    else:
        assert len(saved) == 1 and len(transposes) == 1
        assert out.stat().st_size < model.stat().st_size
