"""Saving survives kill -9 at every step of moving files into place, and two processes writing one path."""

from __future__ import annotations

import signal
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from sqonnx.io.writer import STAGING_PREFIX
from tests.child import finish, run_sqonnx
from tests.paused import marker_of, start_paused
from tests.synthetic import activations

X = activations(1, seed=7)[0]


def external_block(block: Path) -> Path:
    """The synthetic block with its weights in a data file, so the output has one too (two files to move)."""
    path = block.parent / "ext" / "block.onnx"
    path.parent.mkdir()
    onnx.save(onnx.load(str(block)), str(path), save_as_external_data=True, location="block.onnx.data",
              size_threshold=0)
    return path


def quantize(model: Path, out: Path, feeds: Path, alpha: str) -> None:
    result = run_sqonnx("quantize", model, "-o", out, "--calib-data", feeds, "--alpha", alpha)
    assert result.returncode == 0, result.stderr


def outputs(model: Path) -> np.ndarray:
    """The model is whole (checker, onnxruntime loads every weight) and what it computes."""
    onnx.checker.check_model(str(model))
    return ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"x": X})[0]


def data_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".data"))


@pytest.mark.parametrize("point", ["staged", "data-moved", "onnx-moved"])
def test_kill_9_while_saving_leaves_a_whole_model(tmp_path: Path, block: Path, feeds: Path, point: str) -> None:
    """SIGKILL with the new model staged, with its data file moved in but not the .onnx, or with both moved:
    the path holds the previous model or the new one, whole; the next run removes what the killed one left."""
    model = external_block(block)
    reference = tmp_path / "reference"
    reference.mkdir()
    quantize(model, reference / "q.onnx", feeds, "0.9")
    new = outputs(reference / "q.onnx")
    out = tmp_path / "out"
    out.mkdir()
    quantize(model, out / "q.onnx", feeds, "0.5")
    old = outputs(out / "q.onnx")
    assert not np.array_equal(old, new)

    process, _ = start_paused(["quantize", model, "-o", out / "q.onnx", "--calib-data", feeds, "--alpha", "0.9"],
                              point, tmp_path)
    process.send_signal(signal.SIGKILL)
    finish(process, "sqonnx did not exit on SIGKILL", 60)
    np.testing.assert_array_equal(outputs(out / "q.onnx"), new if point == "onnx-moved" else old)
    assert any(p.name.startswith(STAGING_PREFIX) for p in out.iterdir())  # SIGKILL runs no clean-up

    quantize(model, out / "q.onnx", feeds, "0.9")  # cleans up after the killed process
    np.testing.assert_array_equal(outputs(out / "q.onnx"), new)
    assert sorted(p.name for p in out.iterdir()) == ["q.onnx", *data_files(reference)]
    assert data_files(reference) == [f"q.onnx.{data_files(reference)[0].split('.')[2]}.data"]


def test_two_writers_of_one_path(tmp_path: Path, block: Path, feeds: Path) -> None:
    """Two processes with different settings save to one path at the same moment (both released together from
    the point where their output is staged): both succeed and the path holds one of the two models, whole,
    with exactly its own data file."""
    model = external_block(block)
    expected = []
    for alpha in ("0.5", "0.9"):
        (tmp_path / alpha).mkdir()
        quantize(model, tmp_path / alpha / "q.onnx", feeds, alpha)
        expected.append(outputs(tmp_path / alpha / "q.onnx"))
    out = tmp_path / "out"
    out.mkdir()
    processes = [start_paused(["quantize", model, "-o", out / "q.onnx", "--calib-data", feeds, "--alpha", alpha],
                              "staged", tmp_path, tag=alpha)[0] for alpha in ("0.5", "0.9")]
    for alpha in ("0.5", "0.9"):
        marker_of("staged", tmp_path, alpha).unlink()
    for process in processes:
        stdout, stderr = finish(process, "a released writer did not exit", 120)
        assert process.returncode == 0, stderr
    got = outputs(out / "q.onnx")
    assert any(np.array_equal(got, e) for e in expected)
    winner = next(a for a, e in zip(("0.5", "0.9"), expected, strict=True) if np.array_equal(got, e))
    assert sorted(p.name for p in out.iterdir()) == ["q.onnx", *data_files(tmp_path / winner)]


def test_same_weights_same_data_file_name(tmp_path: Path, block: Path, feeds: Path) -> None:
    """The data file is named after its content: the same run twice gives byte-identical files."""
    model = external_block(block)
    first, second = tmp_path / "a", tmp_path / "b"
    for folder in (first, second):
        folder.mkdir()
        quantize(model, folder / "q.onnx", feeds, "0.5")
    assert data_files(first) == data_files(second) and len(data_files(first)) == 1
    for name in ["q.onnx", *data_files(first)]:
        assert (first / name).read_bytes() == (second / name).read_bytes()


def test_writer_keeps_tensors_that_share_a_name_apart(tmp_path: Path) -> None:
    """Two blocks each holding an initializer 'w' (a small one kept in the .onnx, a large one in the data file)
    with different contents: the second is renamed in its block, and each node reads its own."""
    import onnx_ir as ir

    from sqonnx.io.writer import StreamingWriter

    def block(index: int, value: float) -> ir.Model:
        x = ir.Value(name=f"x{index}", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([4]))
        nodes, inits = [], []
        for name, size in (("w", 4), ("big", 1024)):
            init = ir.Value(name=name, type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([size]),
                            const_value=ir.tensor(np.full(size, value, np.float32), name=name))
            inits.append(init)
        mul = ir.node("Mul", [x, inits[0]], name=f"mul{index}", outputs=[ir.Value(name=f"x{index + 1}")])
        nodes.append(mul)
        graph = ir.Graph([x], [mul.outputs[0]], nodes=nodes, initializers=inits, opset_imports={"": 18})
        return ir.Model(graph, ir_version=8)

    with StreamingWriter(tmp_path / "q.onnx", external=True) as writer:
        blocks = [block(0, 2.0), block(1, 3.0)]
        stage = writer.stage("test")
        for b in blocks:
            stage.add(b, shared=set())
        writer.close()  # flushed: the refs read back what was written
        names = [sorted(b.graph.initializers) for b in blocks]
        assert names == [["big", "w"], ["big.1", "w.1"]]
        for b, value in zip(blocks, (2.0, 3.0), strict=True):
            for init in b.graph.initializers.values():
                assert np.all(init.const_value.numpy() == value), init.name
