"""A run is prepare -> plan -> write: every candidate that only the whole model's evidence tells apart is staged
as it is built, the plan picks one, and that stage is moved into place; the others are dropped before. No stage
gets a block twice, in any run: the requested one, --alpha auto's candidates (a single α winning too),
--keep-float-budget's trials, a rotation declined."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import onnx
import pytest

import sqonnx
from models import zoo
from sqonnx import CalibrationConfig, QuantizeConfig
from sqonnx.io.writer import Stage, StreamingWriter
from tests.test_quality import _gained_llama

pytestmark = pytest.mark.zoo


class Writes:
    """Every block added to every stage, and the stage moved into place."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.adds: list[tuple[str, str]] = []  # (stage, block graph)
        self.finished: list[str] = []
        self.stages: list[Stage] = []
        add, finish, stage = Stage.add, StreamingWriter.finish, StreamingWriter.stage

        def counted_add(stage_: Stage, block: Any, shared: set[int], branch: str = "") -> None:
            self.adds.append((f"{stage_.name}{'/' + branch if branch else ''}", str(block.graph.name)))
            add(stage_, block, shared, branch)

        def counted_finish(writer: StreamingWriter, stage_: Stage, *args: Any) -> int:
            self.finished.append(stage_.name)
            # the losers were dropped as soon as they lost: their data files are gone before the output is saved
            assert [s.name for s in self.stages if s is not stage_ and s.data_path.exists()] == []
            return finish(writer, stage_, *args)

        def counted_stage(writer: StreamingWriter, name: str) -> Stage:
            made = stage(writer, name)
            self.stages.append(made)
            return made

        monkeypatch.setattr(Stage, "add", counted_add)
        monkeypatch.setattr(StreamingWriter, "finish", counted_finish)
        monkeypatch.setattr(StreamingWriter, "stage", counted_stage)

    def check_once(self, every_block: bool = True) -> list[str]:
        """One stage moved into place, holding each of its blocks once (`every_block`: every block any stage got);
        no block twice in any stage. Returns the stages' names."""
        assert len(self.finished) == 1, self.finished
        assert len(self.adds) == len(set(self.adds)), "a block written twice into one stage"
        written = [block for stage, block in self.adds if stage == self.finished[0]]
        assert written and len(written) == len(set(written)), written
        if every_block:
            assert set(written) == {block for _, block in self.adds}, written
        return [stage.name for stage in self.stages]


def _calibration(model: Path, tmp_path: Path, samples: int = 16) -> CalibrationConfig:
    return CalibrationConfig(data=zoo.save_npz(model, tmp_path / "calib.npz", samples=samples, seq=32, seed=0),
                             num_samples=samples)


@pytest.mark.parametrize(("options", "stages"), [
    ({}, 1),
    ({"alpha": "auto"}, 4),  # per group, and 0.25, 0.5, 0.75, staged side by side in the calibration pass
    ({"keep_float_budget": 0.0}, None),  # a stage per trial with layers float
])
def test_each_block_is_written_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, options: dict[str, Any],
                                    stages: int | None) -> None:
    model = zoo.build("llama")
    writes = Writes(monkeypatch)
    out = tmp_path / "out" / "q.onnx"
    report = sqonnx.quantize(model, out, QuantizeConfig(calibration=_calibration(model, tmp_path), block_bytes=1,
                                                        **options))
    names = writes.check_once()
    assert len({block for _, block in writes.adds}) > 3  # cut into blocks: the test sees block by block writes
    if stages is not None:
        assert len(names) == stages, names
    if "keep_float_budget" in options:
        trials = report.settings["keep_float"]
        assert isinstance(trials, list) and len(names) == 1 + sum(bool(t["float_layers"]) for t in trials)
    # the losers' data files are gone: only the output (and nothing staged) is left in the folder
    assert sorted(p.name for p in out.parent.iterdir()) == ["q.onnx"]
    metadata = {p.key: p.value for p in onnx.load(str(out), load_external_data=False).metadata_props}
    if options.get("alpha") == "auto":
        chose = str(report.settings["alpha"]).split("chose ")[1].split(" (")[0]
        assert chose in ("per group", "0.25", "0.5", "0.75")
        assert metadata["sqonnx.alpha"] == str(report.settings["alpha"])
        if chose != "per group":
            assert f"alpha-{chose}" in writes.finished[0]
        assert json.loads(metadata.get("sqonnx.alpha_per_layer", "{}")) or chose != "per group"


def test_a_declined_rotation_is_written_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The rotation loses: the rotated stage is dropped and the unrotated run's stage is moved into place."""
    model = _gained_llama(tmp_path)
    writes = Writes(monkeypatch)
    report = sqonnx.quantize(model, tmp_path / "q.onnx", QuantizeConfig(calibration=_calibration(model, tmp_path, 32)))
    assert str(report.settings["rotation"]).startswith("not rotated: the rotation loses")
    names = writes.check_once(every_block=False)  # (the unrotated graph may be cut elsewhere)
    assert len(names) == 2 and writes.finished == [names[1]]


def test_a_single_alpha_that_wins_is_moved_into_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--alpha auto where a single value wins (forced here: 0.25): its stage, built in the calibration pass, is the
    output, every layer at α 0.25, the per-group stage dropped, nothing built again."""
    from sqonnx.run import pipeline

    model = zoo.build("llama")
    writes = Writes(monkeypatch)
    choices: list[list[float]] = []

    def second(errors: list[float]) -> int:
        choices.append(errors)
        return 1

    monkeypatch.setattr(pipeline, "choose_alpha", second)
    report = sqonnx.quantize(model, tmp_path / "q.onnx", QuantizeConfig(
        alpha="auto", block_bytes=1, calibration=_calibration(model, tmp_path)))
    writes.check_once()
    assert len(choices) == 1 and len(choices[0]) == 4
    assert "alpha-0.25" in writes.finished[0]
    assert "chose 0.25" in str(report.settings["alpha"])
    alphas = {layer.alpha for layer in report.layers if layer.quantized and layer.scale_min is not None}
    assert alphas == {0.25}, alphas
    assert report.kernels is not None and report.kernels.checked_blocks > 0  # its blocks' kernels were checked
