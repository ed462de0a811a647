"""Seeded fuzzing of what a user hands `sqonnx quantize`: the model file, the calibration data, the flags.

Each case mutates one input of a small, valid setup (tests/synthetic.py's block; a variant that reads token
ids, with a tokenizer, for text calibration) and runs the command line in-process (`sqonnx.cli.main`, one
process for all cases keeps the run fast). Whatever the input, the run must end in exactly one `error: ...`
line and exit 2, or exit 0 with a model that passes onnx.checker and loads in onnxruntime; never a traceback,
never a file left beside the output or in TMPDIR. A few cases also go through the real `python -m sqonnx`.

`SQONNX_FUZZ_CASES` (default 300) sets how many cases run, `SQONNX_FUZZ_SEED` (default 0) where the seeds
start; a failure names its seed, and `SQONNX_FUZZ_SEED=<seed> SQONNX_FUZZ_CASES=1` replays it.
"""

from __future__ import annotations

import contextlib
import io
import os
import random
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from sqonnx.io.writer import STAGING_PREFIX
from tests.child import run_sqonnx
from tests.synthetic import HIDDEN, activations, build_block

CASES = int(os.environ.get("SQONNX_FUZZ_CASES", "300"))
SEED = int(os.environ.get("SQONNX_FUZZ_SEED", "0"))
WORDS = ["the", "model", "runs", "int8", "kernels", "with", "smooth", "scales", "and", "outliers"]


@dataclass
class Setup:
    """The valid inputs every case starts from."""

    folder: Path
    block: onnx.ModelProto  # float input x [batch, seq, HIDDEN]
    tokens: onnx.ModelProto  # input_ids [batch, seq] -> Gather -> the same block
    tokenizer: Path


@dataclass
class Case:
    seed: int
    description: str
    args: list[str] = field(default_factory=list)


def token_model(block: onnx.ModelProto, vocab: int) -> onnx.ModelProto:
    """The block behind an embedding lookup, so text calibration (input_ids) has a model to feed."""
    model = onnx.ModelProto()
    model.CopyFrom(block)
    graph = model.graph
    embedding = np.random.default_rng(3).standard_normal((vocab, HIDDEN)).astype(np.float32)
    embedding[:, [3, 17]] *= 100.0
    graph.initializer.append(numpy_helper.from_array(embedding, "embed"))
    graph.node.insert(0, helper.make_node("Gather", ["embed", "input_ids"], ["x"], name="/embed/Gather"))
    del graph.input[:]
    graph.input.append(helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]))
    return model


def write_tokenizer(path: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, **{word: i + 1 for i, word in enumerate(WORDS)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(path))
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    folder = tmp_path_factory.mktemp("fuzz-base")
    block = onnx.load(str(build_block(folder / "block.onnx")))
    tokenizer = write_tokenizer(folder / "tokenizer.json")
    return Setup(folder, block, token_model(block, len(WORDS) + 1), tokenizer)


# --- mutators: each writes the case's inputs into `work` and returns the arguments and what it did ---------

def mutate_model(rng: random.Random, setup: Setup, work: Path) -> tuple[list[str], str]:
    model = onnx.ModelProto()
    model.CopyFrom(setup.block)
    graph = model.graph
    kind = rng.choice(["truncate", "bit flips", "drop initializer", "drop node", "initializer dtype",
                       "initializer dims", "cycle", "unknown op", "rename input", "opset", "ir version",
                       "input type", "input shape", "duplicate output", "no graph output", "attribute",
                       "empty", "external data"])
    detail = ""
    path = work / "model.onnx"
    if kind == "drop initializer":
        index = rng.randrange(len(graph.initializer))
        detail = graph.initializer[index].name
        del graph.initializer[index]
    elif kind == "drop node":
        index = rng.randrange(len(graph.node))
        detail = graph.node[index].name
        del graph.node[index]
    elif kind == "initializer dtype":
        tensor = rng.choice(graph.initializer)
        tensor.data_type = rng.choice([0, 2, 3, 5, 6, 7, 9, 10, 11, 16, 17, 23, 99])
        detail = f"{tensor.name} -> {tensor.data_type}"
    elif kind == "initializer dims":
        tensor = rng.choice(graph.initializer)
        dims = list(tensor.dims)
        choice = rng.randrange(4)
        if choice == 0 and dims:
            dims[rng.randrange(len(dims))] += rng.choice([-1, 1, 7])
        elif choice == 1:
            dims.append(rng.choice([1, 2]))
        elif choice == 2 and dims:
            dims[rng.randrange(len(dims))] = -rng.randint(1, 5)
        else:
            dims = []
        del tensor.dims[:]
        tensor.dims.extend(dims)
        detail = f"{tensor.name} -> {dims}"
    elif kind == "cycle":
        later = rng.randrange(1, len(graph.node))
        earlier = rng.randrange(later)
        graph.node[earlier].input[0] = graph.node[later].output[0]
        detail = f"{graph.node[earlier].name} reads {graph.node[later].name}"
    elif kind == "unknown op":
        node = rng.choice(graph.node)
        node.op_type, node.domain = rng.choice([("FooBar", ""), ("Relu", "com.unknown"), ("MatMulFoo", "")])
        detail = node.name
    elif kind == "rename input":
        old = graph.input[0].name
        graph.input[0].name = "renamed"
        detail = f"{old} -> renamed (nodes still read {old})" if rng.random() < 0.5 else "consistently"
        if detail == "consistently":
            for node in graph.node:
                node.input[:] = ["renamed" if i == old else i for i in node.input]
    elif kind == "opset":
        version = rng.choice([0, 1, 7, 9, 10, 11, 12, 13, 17, 21, 23, 30, 99])
        del model.opset_import[:]
        model.opset_import.append(helper.make_opsetid("", version))
        detail = str(version)
    elif kind == "ir version":
        model.ir_version = rng.choice([0, 1, 3, 4, 7, 11, 99])
        detail = str(model.ir_version)
    elif kind == "input type":
        graph.input[0].type.tensor_type.elem_type = rng.choice([0, 2, 6, 7, 8, 10, 11, 99])
        detail = str(graph.input[0].type.tensor_type.elem_type)
    elif kind == "input shape":
        shape = graph.input[0].type.tensor_type.shape
        dims = rng.choice([[], [HIDDEN], [1, 4, HIDDEN + 1], [1, 1, 4, HIDDEN], [0, 4, HIDDEN], [-3, 4, HIDDEN]])
        del shape.dim[:]
        for dim in dims:
            shape.dim.add().dim_value = dim
        detail = str(dims)
    elif kind == "duplicate output":
        a, b = rng.sample(range(len(graph.node)), 2)
        graph.node[a].output[0] = graph.node[b].output[0]
        detail = f"{graph.node[a].name} writes {graph.node[b].output[0]}"
    elif kind == "no graph output":
        del graph.output[:]
    elif kind == "attribute":
        node = rng.choice([n for n in graph.node if n.attribute] or list(graph.node))
        node.attribute.append(helper.make_attribute(rng.choice(["axis", "keepdims", "epsilon", "transB"]),
                                                    rng.choice([5, -7, 0.0, 1e30, "text", [1, 2]])))
        detail = node.name
    elif kind == "external data":
        location = rng.choice(["model.onnx.data", "../../etc/passwd", "/dev/zero", "missing.data"])
        onnx.save(model, str(path), save_as_external_data=True, location="model.onnx.data", size_threshold=0)
        saved = onnx.load(str(path), load_external_data=False)
        for tensor in saved.graph.initializer:
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = location
                elif entry.key in ("offset", "length") and rng.random() < 0.3:
                    entry.value = str(rng.choice([0, 3, 10**12, -1]))
        path.write_bytes(saved.SerializeToString())
        return [str(path), "--calib-data", str(work.parent / "feeds.npz")], f"model: external data {location}"
    data = model.SerializeToString()
    if kind == "truncate":
        cut = rng.randrange(len(data))
        data, detail = data[:cut], f"at {cut} of {len(data)}"
    elif kind == "bit flips":
        buffer = bytearray(data)
        flips = [rng.randrange(len(buffer) * 8) for _ in range(rng.randint(1, 8))]
        for bit in flips:
            buffer[bit // 8] ^= 1 << (bit % 8)
        data, detail = bytes(buffer), f"bits {flips}"
    elif kind == "empty":
        data = b""
    path.write_bytes(data)
    return [str(path), "--calib-data", str(work.parent / "feeds.npz")], f"model: {kind} {detail}"


def mutate_npz(rng: random.Random, setup: Setup, work: Path) -> tuple[list[str], str]:
    x = activations(2, seq=4, seed=rng.randrange(100))
    path = work / "feeds.npz"
    kind = rng.choice(["wrong name", "extra array", "rank", "dtype", "nan", "inf", "empty", "zero length",
                       "scalar", "object", "bit flips", "truncate", "not a zip", "huge values", "folder",
                       "bad member"])
    arrays: dict[str, np.ndarray] = {"x": x}
    if kind == "wrong name":
        arrays = {"input_ids": x}
    elif kind == "extra array":
        arrays = {"x": x, "mask": np.ones((2, 4), np.int64)}
    elif kind == "rank":
        arrays = {"x": x[0] if rng.random() < 0.5 else x[..., None]}
    elif kind == "dtype":
        arrays = {"x": x.astype(rng.choice([np.float64, np.float16, np.int64, np.int8, np.bool_, np.complex64]))}
    elif kind == "nan":
        x[rng.randrange(2), 0, rng.randrange(4), rng.randrange(HIDDEN)] = np.nan
    elif kind == "inf":
        x[rng.randrange(2), 0, rng.randrange(4), rng.randrange(HIDDEN)] = -np.inf
    elif kind == "empty":
        arrays = {"x": x[:0]}
    elif kind == "zero length":
        arrays = {"x": x[:, :, :0]}
    elif kind == "scalar":
        arrays = {"x": np.float32(1.0)}  # type: ignore[dict-item]
    elif kind == "huge values":
        x *= np.float32(1e35)  # finite, but squares and sums overflow float32
    if kind == "object":
        with zipfile.ZipFile(path, "w") as archive:  # what np.savez writes for an object array (pickled)
            buffer = io.BytesIO()
            np.save(buffer, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
            archive.writestr("x.npy", buffer.getvalue())
    elif kind == "bad member":
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("x.npy", rng.randbytes(rng.randrange(200)))
    elif kind == "folder":
        path.mkdir()
    else:
        np.savez(path, **arrays)
    if kind == "bit flips":
        buffer = bytearray(path.read_bytes())
        for _ in range(rng.randint(1, 4)):
            bit = rng.randrange(len(buffer) * 8)
            buffer[bit // 8] ^= 1 << (bit % 8)
        path.write_bytes(bytes(buffer))
    elif kind == "truncate":
        path.write_bytes(path.read_bytes()[: rng.randrange(path.stat().st_size)])
    elif kind == "not a zip":
        path.write_bytes(rng.randbytes(rng.randrange(1, 500)))
    return [str(work.parent / "block.onnx"), "--calib-data", str(path)], f"npz: {kind}"


def mutate_text(rng: random.Random, setup: Setup, work: Path) -> tuple[list[str], str]:
    path = work / "calib.txt"
    kind = rng.choice(["empty", "binary", "nul bytes", "huge line", "unknown words", "short", "good",
                       "folder", "latin-1", "only whitespace"])
    words = " ".join(rng.choice(WORDS) for _ in range(400))
    if kind == "folder":
        path.mkdir()
    else:
        path.write_bytes({
            "empty": b"", "binary": rng.randbytes(2000), "nul bytes": words.replace(" ", "\0 ").encode(),
            "huge line": ("x" * 300_000 + " " + words).encode(), "unknown words": ("zzz " * 300).encode(),
            "short": b"the model", "good": words.encode(), "latin-1": ("caf\xe9 " * 300).encode("latin-1"),
            "only whitespace": b" \n\t" * 500,
        }[kind])
    seq_len = str(rng.choice([2, 8, 16, 64, 1000]))
    return ([str(work.parent / "tokens.onnx"), "--calib-data", str(path), "--seq-len", seq_len, "--num-samples",
             str(rng.choice([1, 2, 3]))], f"text: {kind}, --seq-len {seq_len}")


FLAG_VALUES: dict[str, list[str]] = {
    "--alpha": ["0", "1", "0.5", "auto", "-0.1", "nan", "inf", "abc", "1e400", ""],
    "--alpha-range": ["0,1", "0.9,0.1", "a,b", "0.5", "0,1,2", "nan,nan", "0.2,0.3"],
    "--level": ["O1", "O2", "O3", "O4", "o3", ""],
    "--format": ["qdq", "qoperator", "int"],
    "--calib-method": ["minmax", "percentile", "mse", "entropy"],
    "--target": ["portable", "native", "x86-avx2", "x86-vnni", "arm64", "gpu", "tpu"],
    "--exclude": ["", "*", "*q_proj*", "[", "*MatMul*"],
    "--unabsorbed": ["skip", "mul", "drop"],
    "--num-samples": ["0", "-1", "1", "3", "abc", "99999999999999999999"],
    "--seq-len": ["0", "1", "2", "-4"],
    "--keep-float-budget": ["0", "-1", "nan", "0.1", "inf", "x"],
}
SWITCHES = ["--static", "--dynamic", "--per-token", "--full-range", "--reduce-range", "--per-tensor", "--no-smooth",
            "--no-verify", "--bogus"]


def mutate_flags(rng: random.Random, setup: Setup, work: Path) -> tuple[list[str], str]:
    args = [str(work.parent / "block.onnx"), "--calib-data", str(work.parent / "feeds.npz")]
    for option in rng.sample(sorted(FLAG_VALUES), rng.randint(1, 3)):
        args += [option, rng.choice(FLAG_VALUES[option])]
    args += rng.sample(SWITCHES, rng.randint(0, 2))
    if rng.random() < 0.3:
        args += ["--report-json", str(rng.choice([work / "r.json", work, work / "missing" / "r.json"]))]
    return args, f"flags: {' '.join(args[3:])}"


MUTATORS: list[Callable[[random.Random, Setup, Path], tuple[list[str], str]]] = (
    [mutate_model] * 5 + [mutate_npz] * 2 + [mutate_text] * 2 + [mutate_flags] * 2)


def make_case(seed: int, setup: Setup, folder: Path) -> tuple[Case, Path]:
    """Write case `seed`'s inputs under `folder` (base inputs beside a `work` folder of its own)."""
    rng = random.Random(seed)
    folder.mkdir(parents=True)
    onnx.save(setup.block, str(folder / "block.onnx"))
    onnx.save(setup.tokens, str(folder / "tokens.onnx"))
    (folder / "tokenizer.json").write_bytes(setup.tokenizer.read_bytes())
    np.savez(folder / "feeds.npz", x=activations(2, seq=4))
    work = folder / "work"
    work.mkdir()
    args, description = rng.choice(MUTATORS)(rng, setup, work)
    out = work / "out.onnx"
    return Case(seed, description, ["quantize", *args, "-o", str(out)]), out


def run_in_process(args: list[str], temp: Path) -> tuple[int, str, str]:
    """`sqonnx ...` as the console script runs it, in this process; returns (exit code, stdout, stderr).

    Any exception other than the exit itself escapes, and fails the case with its traceback."""
    from sqonnx.cli import main

    stdout, stderr = io.StringIO(), io.StringIO()
    old_argv, old_tempdir = sys.argv, tempfile.tempdir
    with tempfile.TemporaryFile() as native:  # what C++ (onnxruntime's log) writes to file descriptor 2
        saved = os.dup(2)
        os.dup2(native.fileno(), 2)
        sys.argv, tempfile.tempdir = ["sqonnx", *args], str(temp)
        try:
            with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
                main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sys.argv, tempfile.tempdir = old_argv, old_tempdir
        native.seek(0)
        printed = native.read().decode(errors="replace")
    return code, stdout.getvalue(), printed + stderr.getvalue()


def check_outcome(case: Case, code: int, stderr: str, out: Path, before: set[str], temp: Path) -> str | None:
    """What is wrong with how the case ended, or None."""
    if code == 2:
        errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
        others = [line for line in stderr.splitlines() if line and not line.startswith(("error: ", "WARNING: "))]
        if len(errors) != 1 or others or not stderr.rstrip().splitlines()[-1].startswith("error: "):
            return f"exit 2 but not one error line: {stderr!r}"
        if out.exists():
            return "exit 2 left an output file"
    elif code == 0:
        try:
            onnx.checker.check_model(str(out))
            import onnxruntime as ort

            ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 (any failure to load is the finding)
            return f"exit 0 but the output is not a valid model: {type(exc).__name__}: {exc}"
    else:
        return f"exit {code}: {stderr[-2000:]}"
    left = {p.name for p in out.parent.parent.rglob("*")} - before - {out.name, "r.json"}
    left = {name for name in left if not name.startswith(f"{out.name}.") or not name.endswith(".data")}
    if left:
        return f"left files behind: {sorted(left)}"
    if [p.name for p in temp.iterdir() if p.name.startswith("sqonnx-")]:
        return f"left temporary folders in TMPDIR: {list(temp.iterdir())}"
    if any(p.name.startswith(STAGING_PREFIX) for p in out.parent.rglob("*")):
        return "left a staging folder"
    return None


def test_fuzz_quantize(setup: Setup, tmp_path: Path) -> None:
    """CASES seeded cases in-process; every one ends in one error line (exit 2) or a valid model."""
    failures: list[str] = []
    outcomes: dict[int, int] = {}
    for seed in range(SEED, SEED + CASES):
        case, out = make_case(seed, setup, tmp_path / str(seed))
        before = {p.name for p in out.parent.parent.rglob("*")}
        temp = tmp_path / str(seed) / "tmp"
        temp.mkdir()
        try:
            code, _, stderr = run_in_process(case.args, temp)
        except Exception as exc:  # noqa: BLE001 (a traceback is the finding)
            failures.append(f"seed {seed} ({case.description}): traceback {type(exc).__name__}: {exc}")
            continue
        outcomes[code] = outcomes.get(code, 0) + 1
        problem = check_outcome(case, code, stderr, out, before | {"tmp"}, temp)
        if problem:
            failures.append(f"seed {seed} ({case.description}): {problem}")
    print(f"fuzz: {CASES} cases from seed {SEED}, exit codes {outcomes}")
    assert not failures, "\n".join(failures)


# Cases whose inputs once made sqonnx end in a traceback (issue 11), run through the real command line.
REAL_CLI = {
    "corrupt npz": lambda work: _flip_npz(work),
    "fails in onnxruntime": lambda work: _scale_shape(work),
    "initializer dims disagree with data": lambda work: _bad_dims(work),
    "cycle": lambda work: _cycle(work),
    "usage error": lambda work: [str(work / "block.onnx"), "--level", "O4"],
}


def _flip_npz(work: Path) -> list[str]:
    path = work / "flipped.npz"
    np.savez(path, x=activations(2, seq=4))
    buffer = bytearray(path.read_bytes())
    buffer[len(buffer) // 2] ^= 0xFF  # inside x.npy's data: the CRC check fails when it is read
    path.write_bytes(bytes(buffer))
    return [str(work / "block.onnx"), "--calib-data", str(path)]


def _bad_dims(work: Path) -> list[str]:
    model = onnx.load(str(work / "block.onnx"))
    tensor = next(t for t in model.graph.initializer if t.name == "wq")
    tensor.dims[0] -= 1
    (work / "dims.onnx").write_bytes(model.SerializeToString())
    return [str(work / "dims.onnx"), "--calib-data", str(work / "feeds.npz")]


def _scale_shape(work: Path) -> list[str]:
    """Passes onnx.checker, fails when onnxruntime runs it: onnxruntime must not print its own log line too."""
    model = onnx.load(str(work / "block.onnx"))
    tensor = next(t for t in model.graph.initializer if t.name == "ln.gamma")
    tensor.dims.append(1)
    (work / "scale.onnx").write_bytes(model.SerializeToString())
    return [str(work / "scale.onnx"), "--calib-data", str(work / "feeds.npz")]


def _cycle(work: Path) -> list[str]:
    model = onnx.load(str(work / "block.onnx"))
    model.graph.node[0].input[0] = model.graph.node[-1].output[0]
    (work / "cycle.onnx").write_bytes(model.SerializeToString())
    return [str(work / "cycle.onnx"), "--calib-data", str(work / "feeds.npz")]


@pytest.mark.parametrize("case", sorted(REAL_CLI))
def test_fuzz_findings_through_the_real_cli(tmp_path: Path, case: str) -> None:
    build_block(tmp_path / "block.onnx")
    np.savez(tmp_path / "feeds.npz", x=activations(2, seq=4))
    args = REAL_CLI[case](tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    result = run_sqonnx("quantize", *args, "-o", tmp_path / "out.onnx")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before
