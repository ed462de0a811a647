"""The command line: the happy path, and every bad input gets one line, exit code 2 and no file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from tests.child import finish
from tests.child import run_sqonnx as sqonnx
from tests.paused import ours, start_paused
from tests.synthetic import activations, save_feeds


def test_quantize_command(tmp_path: Path, block: Path, feeds: Path) -> None:
    out = tmp_path / "out" / "q.onnx"
    out.parent.mkdir()
    result = sqonnx("quantize", block, "-o", out, "--alpha", "0.5", "--static", "--calib-data", feeds,
                    "--num-samples", "4", "--report-json", tmp_path / "r.json")
    assert result.returncode == 0, result.stderr
    assert "quantized 7 of 7 linear layers" in result.stdout
    assert "integer kernels: 7 MatMulIntegerToFloat" in result.stdout
    assert onnx.load(str(out)).graph.node
    assert sorted(p.name for p in out.parent.iterdir()) == ["q.onnx"]  # no temporary left behind
    assert '"folded_into": "/mlp/up_proj/MatMul"' in (tmp_path / "r.json").read_text()


@pytest.mark.parametrize(("flags", "level", "integer_op"), [
    (["--dynamic"], "O2", "DynamicQuantizeLinear"), (["--dynamic", "--per-token"], "O1", "MatMulInteger"),
    (["--level", "O3", "--format", "qoperator"], "O3", "MatMulInteger"),
    (["--static", "--target", "gpu", "--full-range"], "O3", "QuantizeLinear")])
def test_level_flags(tmp_path: Path, block: Path, feeds: Path, flags: list[str], level: str, integer_op: str) -> None:
    out = tmp_path / "q.onnx"
    result = sqonnx("quantize", block, "-o", out, "--calib-data", feeds, "--num-samples", "4", *flags)
    assert result.returncode == 0, result.stderr
    assert f"level {level}" in result.stdout
    proto = onnx.load(str(out))
    assert {p.key: p.value for p in proto.metadata_props}["sqonnx.level"] == level
    assert integer_op in {n.op_type for n in proto.graph.node}


def _no_input_model(path: Path) -> Path:
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="relu")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    return path


def _opset9_model(path: Path) -> Path:
    weight = onnx.numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [weight])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)]), path)
    return path


def _bad_cases(tmp: Path, block: Path, feeds: Path) -> dict[str, tuple[list[str | Path], str]]:
    junk = tmp / "junk.onnx"
    junk.write_bytes(b"this is not a protobuf at all \x00\xff" * 10)
    wrong_name = tmp / "wrong_name.npz"
    np.savez(wrong_name, input_ids=np.zeros((2, 1, 16), np.int64))
    wrong_shape = tmp / "wrong_shape.npz"
    np.savez(wrong_shape, x=np.zeros((2, 1, 16, 5), np.float32))
    wrong_dtype = tmp / "wrong_dtype.npz"
    np.savez(wrong_dtype, x=activations(2).astype(np.float64))
    truncated = tmp / "truncated.onnx"
    truncated.write_bytes(block.read_bytes()[: block.stat().st_size // 2])
    external = tmp / "external.onnx"
    onnx.save(onnx.load(str(block)), str(external), save_as_external_data=True, location="external.onnx.data",
              size_threshold=0)
    (tmp / "external.onnx.data").unlink()
    out = tmp / "out.onnx"
    return {
        "missing external data": ([external, "-o", out], "external data file"),
        "not onnx": ([junk, "-o", out], "not a readable ONNX model"),
        "truncated onnx": ([truncated, "-o", out], "not a readable ONNX model"),
        "old opset": ([_opset9_model(tmp / "old.onnx"), "-o", out], "needs opset 13 or newer"),
        "missing model": ([tmp / "nope.onnx", "-o", out], "model file not found"),
        "nothing to quantize": ([_no_input_model(tmp / "relu.onnx"), "-o", out], "no MatMul/Gemm"),
        "everything excluded": ([block, "-o", out, "--exclude", "*MatMul*", "--calib-data", feeds],
                                "outside --exclude"),
        "npz names": ([block, "-o", out, "--calib-data", wrong_name], "model's inputs are ['x']"),
        "npz shape": ([block, "-o", out, "--calib-data", wrong_shape], "per sample but the model needs"),
        "npz dtype": ([block, "-o", out, "--calib-data", wrong_dtype], "float64; the model needs float32"),
        "missing data": ([block, "-o", out, "--calib-data", tmp / "none.npz"], "calibration data not found"),
        "no tokenizer": ([block, "-o", out], "no tokenizer.json beside the model"),
        "alpha": ([block, "-o", out, "--alpha", "1.5"], "--alpha must be between 0 and 1"),
        "output is input": ([block, "-o", block, "--calib-data", feeds], "is the input model"),
        "output folder under a file": ([block, "-o", block / "sub" / "q.onnx", "--calib-data", feeds],
                                       "is a file; choose another --output"),
        "unwritable": ([block, "-o", "/proc/q.onnx", "--calib-data", feeds], "/proc"),
        "full range on a portable target": ([block, "-o", out, "--full-range", "--calib-data", feeds],
                                            "--full-range saturates int16"),
        "static and dynamic": ([block, "-o", out, "--static", "--dynamic", "--calib-data", feeds],
                               "--static contradicts --dynamic"),
        "level contradicts flag": ([block, "-o", out, "--level", "O1", "--static", "--calib-data", feeds],
                                   "--level O1 contradicts the O3 implied by --static"),
        "negative keep-float budget": ([block, "-o", out, "--keep-float-budget", "-1", "--calib-data", feeds],
                                       "--keep-float-budget must be >= 0"),
        "level auto and static": ([block, "-o", out, "--level", "auto", "--static", "--calib-data", feeds],
                                  "--level auto contradicts --static/--dynamic/--per-token"),
        "smooth-only without smoothing": ([block, "-o", out, "--smooth-only", "--no-smooth", "--calib-data", feeds],
                                          "--smooth-only contradicts --no-smooth"),
    }


CASES = ["missing external data", "not onnx", "truncated onnx", "old opset", "missing model",
         "nothing to quantize", "everything excluded", "npz names", "npz shape", "npz dtype", "missing data",
         "no tokenizer", "alpha", "output is input", "output folder under a file", "unwritable",
         "full range on a portable target", "static and dynamic", "level contradicts flag",
         "negative keep-float budget", "level auto and static", "smooth-only without smoothing"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input(tmp_path: Path, case: str) -> None:
    from tests.synthetic import build_block

    work = tmp_path / "work"
    work.mkdir()
    block = build_block(work / "block.onnx")
    feeds = save_feeds(work / "feeds.npz", activations(2))
    args, message = _bad_cases(work, block, feeds)[case]
    before = sorted(p.name for p in work.iterdir())
    result = sqonnx("quantize", *args)
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert message in lines[0]
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in work.iterdir()) == before  # no output, no temporary files


def test_nan_in_calibration_data(tmp_path: Path, block: Path) -> None:
    x = activations(3)
    x[1, 0, 4, 2] = np.nan
    feeds = save_feeds(tmp_path / "nan.npz", x)
    result = sqonnx("quantize", block, "-o", tmp_path / "q.onnx", "--calib-data", feeds)
    assert result.returncode == 2 and result.stderr.strip() == (
        "error: array 'x' in nan.npz has NaN or infinite values (sample 1); remove those samples")
    assert not (tmp_path / "q.onnx").exists()


class _FailingFile:
    """A data file whose first write stops half-way with `error` (what a full disk or Ctrl-C does)."""

    def __init__(self, handle: object, error: BaseException) -> None:
        self.handle, self.error = handle, error

    def write(self, data: object) -> int:
        self.handle.write(b"partial")  # type: ignore[attr-defined]
        raise self.error

    def __getattr__(self, name: str) -> object:
        return getattr(self.handle, name)


def _failing_writes(monkeypatch: pytest.MonkeyPatch, error: BaseException) -> None:
    from sqonnx.io.writer import Stage

    real_init = Stage.__init__

    def failing_init(self: Stage, *args: object) -> None:
        real_init(self, *args)  # type: ignore[arg-type]
        self._file = _FailingFile(self._file, error)  # type: ignore[assignment]

    monkeypatch.setattr(Stage, "__init__", failing_init)


def test_disk_full_leaves_nothing(tmp_path: Path, block: Path, feeds: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that fails for lack of space (faked here; `test_full_tmpfs_leaves_nothing` fills a real one): one
    error naming the folder and the space, no output, no staging folder, and the folders sqonnx created are gone."""
    import errno

    import sqonnx as api

    out = tmp_path / "out" / "deeper"
    _failing_writes(monkeypatch, OSError(errno.ENOSPC, "No space left on device"))
    config = api.QuantizeConfig(calibration=api.CalibrationConfig(data=feeds, num_samples=2))
    with pytest.raises(api.SqonnxError, match=f"no space left in {out} after writing 0 MB of the output"):
        api.quantize(block, out / "q.onnx", config)
    assert not (tmp_path / "out").exists()


def test_full_tmpfs_leaves_nothing(tmp_path: Path, block: Path, feeds: Path) -> None:
    """A real size-limited folder (a 4 KB tmpfs, mounted as root where the machine allows it) that fills up while
    the output is written: one line, exit 2, nothing left in it."""
    import subprocess

    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4k", "tmpfs", str(mount)], capture_output=True,
                      timeout=60).returncode:
        pytest.skip("cannot mount a tmpfs here (not root, or no CAP_SYS_ADMIN)")
    try:
        result = sqonnx("quantize", block, "-o", mount / "q.onnx", "--calib-data", feeds, "--num-samples", "2")
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: no space left in {mount}"), result.stderr
        assert list(mount.iterdir()) == []
    finally:
        subprocess.run(["umount", str(mount)], check=False, timeout=60)


@pytest.mark.parametrize(("point", "signal_name", "code", "message"), [
    ("calibration", "SIGINT", 130, "interrupted: no output written"),
    ("staged", "SIGINT", 130, "interrupted: no output written"),
    ("calibration", "SIGTERM", 143, "terminated: no output written"),
    ("staged", "SIGTERM", 143, "terminated: no output written"),
])
def test_signal_leaves_nothing(tmp_path: Path, block: Path, feeds: Path, point: str, signal_name: str, code: int,
                               message: str) -> None:
    """Ctrl-C or SIGTERM while onnxruntime calibrates, or with the output staged but not yet moved: one line,
    exit 130 / 143, no output, no staging folder beside it, no temporary folder in TMPDIR."""
    import signal

    out = tmp_path / "out"
    out.mkdir()
    process, temp = start_paused(["quantize", block, "-o", out / "q.onnx", "--calib-data", feeds], point, tmp_path)
    process.send_signal(getattr(signal, signal_name))
    _, stderr = finish(process, f"sqonnx did not exit on {signal_name}", 60)
    assert process.returncode == code, stderr
    assert stderr.strip() == message
    assert list(out.iterdir()) == [] and ours(temp) == []


def test_ctrl_c_while_saving_leaves_nothing(tmp_path: Path, block: Path, feeds: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C arriving in the middle of writing the output: the staged file and its folder go away."""
    import sqonnx as api

    out = tmp_path / "out"
    out.mkdir()
    _failing_writes(monkeypatch, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        api.quantize(block, out / "q.onnx", api.QuantizeConfig(calibration=api.CalibrationConfig(data=feeds)))
    assert list(out.iterdir()) == []
