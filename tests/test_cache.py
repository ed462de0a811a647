"""--cache-dir: a run killed after some blocks resumes where it stopped and writes what an uninterrupted run writes;
a rerun with another α, level or target calibrates nothing; a cache of another model, other data or other
options that matter is refused in one line. --sequential calibrates each block on the INT8 blocks before it."""

from __future__ import annotations

import signal
from pathlib import Path

import numpy as np
import pytest

import sqonnx
from models import zoo
from sqonnx import CalibrationConfig, QuantizeConfig
from sqonnx.calibrators import channel_max
from tests.child import finish
from tests.child import run_sqonnx as run_cli
from tests.paused import start_paused

pytestmark = pytest.mark.zoo
BLOCK = 1  # every allowed cut: the zoo's Llama in 6 blocks


@pytest.fixture
def model(tmp_path: Path) -> tuple[Path, Path]:
    source = zoo.build("llama")
    return source, zoo.save_npz(source, tmp_path / "calib.npz", samples=4, seq=32, seed=0)


def _config(feeds: Path, cache: Path | None, **options: object) -> QuantizeConfig:
    return QuantizeConfig(calibration=CalibrationConfig(data=feeds, num_samples=4), block_bytes=BLOCK,
                          cache_dir=cache, **options)  # type: ignore[arg-type]


def _count_runs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    runs: list[int] = []
    real = channel_max.StatisticsSession.run

    def counted(session, feeds, **kwargs):  # noqa: ANN001, ANN202
        runs.append(1)
        return real(session, feeds, **kwargs)

    monkeypatch.setattr(channel_max.StatisticsSession, "run", counted)
    return runs


def test_rerun_with_other_choices_calibrates_nothing(tmp_path: Path, model: tuple[Path, Path],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    source, feeds = model
    cache = tmp_path / "cache"
    first = sqonnx.quantize(source, tmp_path / "a.onnx", _config(feeds, cache))
    blocks = int(str(first.settings["blocks"]).split()[0])
    assert first.settings["cache"] == f"{cache}: calibration kept for later runs" and blocks >= 4
    runs = _count_runs(monkeypatch)
    for options in ({"alpha": 0.75}, {"per_token_where_needed": False}, {"exclude": ("*lm_head*",)},
                    {"reduce_range": False, "target": sqonnx.Target.X86_VNNI}):
        runs.clear()
        report = sqonnx.quantize(source, tmp_path / "b.onnx", _config(feeds, cache, **options))
        assert runs == [], options  # no calibration run at all
        assert report.settings["cache"] == f"{cache}: calibration of blocks 1-{blocks} reused", options
        fresh = sqonnx.quantize(source, tmp_path / "c.onnx", _config(feeds, None, **options))
        assert runs, options
        assert (tmp_path / "b.onnx").read_bytes() == (tmp_path / "c.onnx").read_bytes(), options
        assert [r.static_range for r in report.layers] == [r.static_range for r in fresh.layers]


def test_killed_run_resumes_where_it_stopped(tmp_path: Path, model: tuple[Path, Path]) -> None:
    source, feeds = model
    (tmp_path / "whole").mkdir()
    sqonnx.quantize(source, tmp_path / "whole" / "q.onnx", _config(feeds, None))
    cache, out = tmp_path / "cache", tmp_path / "out" / "q.onnx"
    args = ["quantize", source, "-o", out, "--calib-data", feeds, "--num-samples", "4", "--block-size", "0.000001",
            "--cache-dir", cache]
    process, _ = start_paused(args, "block-2", tmp_path)  # blocks 0, 1 and 2 calibrated and kept
    process.send_signal(signal.SIGKILL)
    finish(process, "sqonnx did not exit on SIGKILL", 60)
    assert not out.exists()
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    assert "--cache-dir " + f"{cache}: calibration of blocks 1-3 reused" in result.stdout, result.stdout
    assert out.read_bytes() == (tmp_path / "whole" / "q.onnx").read_bytes()


@pytest.mark.parametrize(("change", "named"), [
    ("model", "another model"), ("data", "another calibration data"), ("block size", "another block size"),
])
def test_cache_of_something_else_is_refused(tmp_path: Path, model: tuple[Path, Path], change: str, named: str) -> None:
    source, feeds = model
    cache = tmp_path / "cache"
    sqonnx.quantize(source, tmp_path / "a.onnx", _config(feeds, cache))
    args: list[object] = ["quantize", source, "-o", tmp_path / "b.onnx", "--calib-data", feeds, "--num-samples", "4",
                          "--block-size", "0.000001", "--cache-dir", cache]
    if change == "model":
        args[1] = zoo.build("mistral")  # the same inputs and vocabulary: the same calibration data fits it
    elif change == "data":
        args[5] = zoo.save_npz(source, tmp_path / "other.npz", samples=4, seq=32, seed=1)
    else:
        args[9] = "0.5"
    result = run_cli(*args)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: --cache-dir {cache} holds calibration of {named}; give an empty folder, or delete this one"]
    assert not (tmp_path / "b.onnx").exists()


def test_sequential_calibrates_on_the_int8_blocks(tmp_path: Path, model: tuple[Path, Path]) -> None:
    """Each block's statistics come from the INT8 blocks before it: the first block's are the FP model's, later
    ones differ; the model is as good as the FP-calibrated one (within 25 %, on held-out windows)."""
    source, feeds = model
    plain = sqonnx.quantize(source, tmp_path / "fp.onnx", _config(feeds, None))
    sequential = sqonnx.quantize(source, tmp_path / "seq.onnx", _config(feeds, None, sequential=True))
    assert sequential.settings["sequential"] == "each block calibrated on the INT8 output of the blocks before it"
    ranges = {r.name: r.static_range for r in plain.layers}
    changed = [r.name for r in sequential.layers if abs(r.static_range - ranges[r.name]) > 1e-6 * ranges[r.name]]
    assert changed and "/model/layers.0/self_attn/q_proj/MatMul" not in changed, changed
    held_out = zoo.feeds(source, 2, 32, seed=7)
    reference = zoo.logits(source, held_out)

    def error(path: Path) -> float:
        return float(np.linalg.norm(zoo.logits(path, held_out) - reference) / np.linalg.norm(reference))

    assert error(tmp_path / "seq.onnx") < 1.25 * error(tmp_path / "fp.onnx")


def test_rerun_that_compares_outputs_resumes_before_the_output_block(tmp_path: Path, model: tuple[Path, Path],
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A rerun that judges models against FP outputs the first run did not keep (no quality check there;
    --keep-float-budget: not a calibration option, so the same cache serves it) needs the FP outputs of the last
    block: it resumes before that block, from the carried values kept there, and calibrates only the last one."""
    source, feeds = model
    cache = tmp_path / "cache"
    first = sqonnx.quantize(source, tmp_path / "a.onnx", _config(feeds, cache, check_samples=0))
    blocks = int(str(first.settings["blocks"]).split()[0])
    runs = _count_runs(monkeypatch)
    report = sqonnx.quantize(source, tmp_path / "b.onnx", _config(feeds, cache, keep_float_budget=1.0,
                                                                 check_samples=0))
    assert report.settings["cache"] == f"{cache}: calibration of blocks 1-{blocks - 1} reused"
    assert len(runs) == 4  # the 4 samples through the last block only
    assert report.settings["keep_float"][0]["float_layers"] == []
