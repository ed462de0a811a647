"""--keep-float-budget: the most sensitive layers stay in float, fewest first, until the budget is met."""

from __future__ import annotations

import json
from pathlib import Path

import onnx

import sqonnx
from sqonnx import CalibrationConfig, QuantizeConfig


def test_float_layers_until_the_budget_is_met(tmp_path: Path, block: Path, feeds: Path) -> None:
    calibration = CalibrationConfig(data=feeds, num_samples=8)
    everything = sqonnx.quantize(block, tmp_path / "all.onnx", QuantizeConfig(keep_float_budget=1.0,
                                                                              calibration=calibration))
    all_int8_loss = everything.settings["keep_float"][0]["quality_loss"]
    assert all_int8_loss > 0
    budget = all_int8_loss / 2  # needs some layers in float
    out = tmp_path / "q.onnx"
    report = sqonnx.quantize(block, out, QuantizeConfig(keep_float_budget=budget, calibration=calibration))
    trials = report.settings["keep_float"]
    counts = [len(t["float_layers"]) for t in trials]
    doubling = counts[: next((i for i, t in enumerate(trials) if t["quality_loss"] <= budget), len(trials)) + 1]
    assert counts[0] == 0 and all(b in (1, 2 * a) for a, b in zip(doubling, doubling[1:], strict=False))
    chosen = [t for t in trials if t["chosen"]]
    assert len(chosen) == 1 and chosen[0]["quality_loss"] <= budget
    kept = chosen[0]["float_layers"]
    # the fewest that fit: every count below it was tried in vain, and the one just below was tried
    assert all(t["quality_loss"] > budget for t in trials if len(t["float_layers"]) < len(kept))
    assert len(kept) - 1 in counts
    assert trials[0]["quality_loss"] == all_int8_loss
    by_count = sorted(trials, key=lambda t: len(t["float_layers"]))
    for shorter, longer in zip(by_count, by_count[1:], strict=False):  # the most sensitive first: choices are nested
        assert longer["float_layers"][: len(shorter["float_layers"])] == shorter["float_layers"]
    assert kept and {layer.name for layer in report.layers if not layer.quantized} == set(kept)
    proto = onnx.load(str(out))
    float_matmuls = {n.name for n in proto.graph.node if n.op_type == "MatMul"
                     and not n.input[1].endswith("dequantized")}
    assert float_matmuls == set(kept)
    assert json.loads({p.key: p.value for p in proto.metadata_props}["sqonnx.float_layers"]) == kept


def test_budget_already_met_keeps_nothing(tmp_path: Path, block: Path, feeds: Path) -> None:
    report = sqonnx.quantize(block, tmp_path / "q.onnx", QuantizeConfig(
        keep_float_budget=1.0, calibration=CalibrationConfig(data=feeds, num_samples=4)))
    assert [t["float_layers"] for t in report.settings["keep_float"]] == [[]]
    assert all(layer.quantized for layer in report.layers)
