"""Atomic, streaming saving: the output file appears whole and checked, or not at all."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from sqonnx.errors import SqonnxError
from sqonnx.graph.tensors import release
from sqonnx.io.load import check_onnx
from sqonnx.pause import pause_point

# Protobuf cannot serialize a model over 2 GiB; keep a margin for the graph itself.
EXTERNAL_DATA_BYTES = 1_800_000_000


def check_output_path(input_path: Path, output_path: Path) -> None:
    if output_path.resolve() == input_path.resolve():
        raise SqonnxError(f"output path {output_path} is the input model; choose another --output")
    if output_path.is_dir():
        raise SqonnxError(f"output path {output_path} is a folder; give a file name ending in .onnx")
    folder = output_path.parent
    existing = next((p for p in (folder, *folder.parents) if p.exists()), folder)
    if not existing.is_dir():
        raise SqonnxError(f"output folder {folder}: {existing} is a file; choose another --output")
    if not os.access(existing, os.W_OK):
        raise SqonnxError(f"output folder {existing} is not writable; choose another --output")


class Stage:
    """One candidate output, written block by block: each block's tensors go to a data file of the stage's own in the
    staging folder, and only the block's graph is kept, its tensors pointing into that file. The run moves one stage
    into place (`StreamingWriter.finish`); the others are dropped (`drop`, or with the staging folder).

    Candidates that only a whole-model judgement tells apart (--alpha auto's single values against per-group α) are
    staged side by side in one pass: each block of each is written once, and nothing is written again."""

    def __init__(self, folder: Path, name: str, output_folder: Path) -> None:
        self.name = name
        self.folder = folder
        self.output_folder = output_folder
        self.data_name = f"{name}.{PARTIAL_DATA}"
        self.data_path = folder / self.data_name
        try:
            self._file = open(self.data_path, "wb")  # noqa: SIM115 (closed in close())
        except OSError as exc:
            raise SqonnxError(_no_space(output_folder, exc, 0)) from None
        self._offset = 0
        self.digest = hashlib.sha256()
        self._written: dict[str, tuple[int, ir.ExternalTensor]] = {}  # name -> (id of its source tensor, ref)
        self._inline: dict[str, tuple[str, tuple[int, ...], bytes]] = {}  # small tensors kept in the .onnx
        self.blocks: list[ir.Model] = []
        self.decode_blocks: list[ir.Model] = []  # the decode stage's (--decode-weights): the graph then branches

    @property
    def bytes_written(self) -> int:
        return self._offset

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()

    def drop(self) -> None:
        """This candidate lost: its data file goes now (the disk it took is free for the next)."""
        self.close()
        self.blocks = []
        self.decode_blocks = []
        self._offset = 0
        self.data_path.unlink(missing_ok=True)

    def add(self, block: ir.Model, shared: set[int], branch: str = "") -> None:
        """Write `block`'s tensors (but the smallest, which stay in its graph) and keep its graph. `shared`: ids
        of the tensors the full model holds for the whole run; one of them read by several blocks is written
        once (an id is compared only while its tensor is alive, so it cannot stand for another). `branch` DECODE:
        a decode stage's block, whose tensors equal to the prompt stage's (the embedding, norms) are not written
        again: a name in both branches is one tensor (`_assemble_phases` puts it in the outer graph)."""
        graph = block.graph
        for value in list(graph.initializers.values()):
            tensor = value.const_value
            if tensor is None:
                continue
            name = str(value.name)
            if tensor.nbytes < INLINE_BYTES:  # stays in the .onnx (not in another file), under a name of its own
                data = tensor.numpy()
                if isinstance(tensor, (ir.ExternalTensor, ir.LazyTensor)):
                    value.const_value = ir.tensor(data, name=name)
                key = (str(tensor.dtype), tuple(tensor.shape), data.tobytes())
                if name in self._written or self._inline.setdefault(name, key) != key:
                    value.name = name = _unique(name, {**self._written, **self._inline}, graph)
                    self._inline[name] = key
                continue
            known = self._written.get(name)
            if known is not None and known[0] == id(tensor) and id(tensor) in shared:
                value.const_value = known[1]
                continue
            if known is not None and branch == DECODE and self._holds(known[1], tensor):
                value.const_value = known[1]
                continue
            if known is not None or name in self._inline:  # the same name, changed in this block only
                value.name = name = _unique(name, {**self._written, **self._inline}, graph)
            value.const_value = self._write(tensor, name)
            self._written[name] = (id(tensor), value.const_value)
        (self.decode_blocks if branch == DECODE else self.blocks).append(block)

    def _holds(self, ref: ir.ExternalTensor, tensor: ir.TensorProtocol) -> bool:
        """Whether the tensor written at `ref` is `tensor`, byte for byte (read back: a decode block's tensors are
        compared only where a name is taken)."""
        if ref.dtype != tensor.dtype or tuple(ref.shape) != tuple(tensor.shape):
            return False
        self._file.flush()
        return bool(np.array_equal(_read(self.data_path, ref).reshape(-1).view(np.uint8),
                                   np.ascontiguousarray(tensor.numpy()).reshape(-1).view(np.uint8)))

    def _write(self, tensor: ir.TensorProtocol, name: str) -> ir.ExternalTensor:
        padding = (-self._offset) % ALIGNMENT if tensor.nbytes >= ALIGN_FROM_BYTES else 0
        try:
            length = self._append(tensor, name, padding)
        finally:
            release(tensor)
        offset = self._offset + padding
        self._offset = offset + length
        return ir.ExternalTensor(self.data_name, offset, length, tensor.dtype, shape=ir.Shape(tensor.shape),
                                 name=name, base_dir=str(self.folder))

    def _append(self, tensor: ir.TensorProtocol, name: str, padding: int) -> int:
        data = np.ascontiguousarray(tensor.numpy()).reshape(-1).view(np.uint8)
        self.digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        self.digest.update(data)
        try:
            self._file.write(b"\0" * padding)
            self._file.write(data)
        except OSError as exc:
            raise SqonnxError(_no_space(self.output_folder, exc, self._offset)) from None
        return int(data.nbytes)


class StreamingWriter:
    """Writes the output block by block, then moves it into place atomically.

    The output is written as one or more candidate `Stage`s in a staging folder beside the output (named
    `.sqonnx-<pid>-*`); `finish` assembles the chosen stage's model from its blocks' graphs, checks it, and moves it
    into place. Nothing is held or copied whole: peak memory is one block, and the staging folder holds the
    candidates and the scratch files of the run (`scratch`), removed on the way out whatever happens. A process
    killed with SIGKILL leaves its staging folder, which the next save into that folder removes.

    Weights go to a data file beside the output when asked (the input had external data) or when the model
    would not fit in one protobuf; otherwise they are read back into one .onnx file. Two renames (data file,
    then .onnx) are not atomic together, so the data file is named after its content, `<output>.<digest>.data`
    (the digest of every tensor's name, type, shape and bytes, in the order written): the new .onnx refers to
    its own data file, the previous .onnx keeps its own until the new one has replaced it, and only then are
    stale data files removed. A process killed at any point leaves the previous model or the new one at
    `output_path`, both whole. Moving into place holds a lock on the folder, so two processes writing the
    same output never remove each other's data file; the last one to finish wins. `companions` (file name ->
    bytes, e.g. an onnxruntime-genai config) are staged too and moved in before the .onnx.
    """

    def __init__(self, output_path: Path, external: bool, companions: dict[str, bytes] | None = None) -> None:
        self.output_path = output_path
        self.external = external
        self.companions = companions or {}
        folder = output_path.parent
        self.created = _missing_folders(folder)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SqonnxError(f"cannot create output folder {folder}: {exc.strerror}; choose another --output") \
                from None
        remove_stale_staging(folder)
        try:
            self.staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=folder))
        except OSError as exc:
            self._remove_created()
            raise SqonnxError(f"cannot write in {folder}: {exc.strerror}") from None
        self.scratch = self.staging / "scratch"
        self.scratch.mkdir()
        self.stages: list[Stage] = []

    def __enter__(self) -> StreamingWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
        shutil.rmtree(self.staging, ignore_errors=True)
        if exc[0] is not None:
            self._remove_created()

    def stage(self, name: str) -> Stage:
        """A new candidate output (`name`: a file-name-safe label, unique in the run)."""
        label = re.sub(r"[^A-Za-z0-9.-]+", "-", name)
        made = Stage(self.staging, f"{len(self.stages)}-{label}", self.output_path.parent)
        self.stages.append(made)
        return made

    def close(self) -> None:
        for stage in self.stages:
            stage.close()

    @property
    def bytes_written(self) -> int:
        return sum(stage.bytes_written for stage in self.stages)

    def finish(self, stage: Stage, skeleton: ir.Model, metadata: dict[str, str]) -> int:
        """Assemble the model from `stage`'s blocks (inputs, outputs and header from `skeleton`), check it and move
        it into place. Returns the bytes written."""
        self.close()
        for other in self.stages:
            if other is not stage:
                other.drop()
        external = self.external or stage.bytes_written > EXTERNAL_DATA_BYTES
        data_name = f"{self.output_path.name}.{stage.digest.hexdigest()[:_DIGEST_CHARS]}.data" if external else None
        if data_name is not None:
            os.replace(stage.data_path, self.staging / data_name)
        for block in (*stage.blocks, *stage.decode_blocks):
            for value in block.graph.initializers.values():
                ref = value.const_value
                if isinstance(ref, ir.ExternalTensor) and ref.location == stage.data_name:
                    value.const_value = (ir.ExternalTensor(data_name, ref.offset, ref.length, ref.dtype,
                                                           shape=ref.shape, name=ref.name, base_dir=str(self.staging))
                                         if data_name is not None else ir.tensor(_read(stage.data_path, ref),
                                                                                 name=ref.name))
        proto = _assemble(skeleton, stage.blocks, metadata) if not stage.decode_blocks else \
            _assemble_phases(skeleton, stage.blocks, stage.decode_blocks, metadata)
        staged = self.staging / self.output_path.name
        try:
            with open(staged, "wb") as handle:
                handle.write(proto.SerializeToString())
        except OSError as exc:
            raise SqonnxError(_no_space(self.output_path.parent, exc, stage.bytes_written)) from None
        del proto
        if data_name is None:
            stage.data_path.unlink(missing_ok=True)
        check_onnx(staged)
        written = staged.stat().st_size + ((self.staging / data_name).stat().st_size if data_name else 0)
        folder = self.output_path.parent
        for name, content in self.companions.items():
            try:
                (self.staging / name).write_bytes(content)
            except OSError as exc:
                raise SqonnxError(f"cannot write {folder / name}: {exc.strerror}") from None
        pause_point("staged")
        with _folder_lock(folder):
            if data_name is not None:
                os.replace(self.staging / data_name, folder / data_name)
                pause_point("data-moved")
            for name in self.companions:
                os.replace(self.staging / name, folder / name)
            os.replace(staged, self.output_path)
            pause_point("onnx-moved")
            for stale in stale_data_files(self.output_path, keep=data_name):
                stale.unlink(missing_ok=True)
        self.created = []  # the folder now holds the output
        return written

    def _remove_created(self) -> None:
        for folder in self.created:  # innermost first; only if nothing else was put there
            with contextlib.suppress(OSError):
                folder.rmdir()


PARTIAL_DATA = "weights.partial.data"  # a stage's data file: <stage>.weights.partial.data
INLINE_BYTES = 1024  # smaller tensors stay in the .onnx (shapes, scales, zero points, norm weights of tiny models)
ALIGNMENT = 4096  # large tensors start on a page: onnxruntime can map them instead of copying
ALIGN_FROM_BYTES = 1 << 20


def _missing_folders(folder: Path) -> list[Path]:
    """The folders `mkdir(parents=True)` would create, innermost first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def _unique(name: str, taken: dict[str, object], graph: ir.Graph) -> str:
    counter = 1
    while f"{name}.{counter}" in taken or f"{name}.{counter}" in graph.initializers:
        counter += 1
    return f"{name}.{counter}"


def _read(path: Path, ref: ir.ExternalTensor) -> np.ndarray:
    with open(path, "rb") as handle:
        handle.seek(ref.offset or 0)
        raw = handle.read(ref.length or 0)
    return np.frombuffer(raw, dtype=ref.dtype.numpy()).reshape(tuple(ref.shape))


def _no_space(folder: Path, exc: OSError, written: int) -> str:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return _space_message(folder, written)
    return f"cannot write in {folder}: {exc.strerror}"


def no_space(folder: Path, writer: StreamingWriter | None) -> str:
    """The one-line error for a folder that filled up while sqonnx wrote there."""
    return _space_message(folder, writer.bytes_written if writer is not None else 0)


def _space_message(folder: Path, written: int) -> str:
    free = shutil.disk_usage(folder).free
    return (f"no space left in {folder} after writing {written / 1e6:.0f} MB of the output "
            f"({free / 1e6:.0f} MB free); free some space there or write the output elsewhere")


def _assemble(skeleton: ir.Model, blocks: list[ir.Model], metadata: dict[str, str]) -> onnx.ModelProto:
    """One model from the blocks' graphs, linked by value names; inputs, outputs and header from `skeleton`."""
    proto = _header(skeleton, metadata)
    graph = skeleton.graph
    opsets = _link(proto.graph, blocks, {v.name for v in (*graph.inputs, *graph.outputs)})
    _opsets(proto, skeleton, opsets)
    return proto


DECODE = "decode"  # Stage.add's branch of a decode stage's blocks
PHASE_INPUT = "input_ids"  # its token count picks the branch


def _assemble_phases(skeleton: ir.Model, prompt: list[ir.Model], decode: list[ir.Model],
                     metadata: dict[str, str]) -> onnx.ModelProto:
    """One model whose body branches on the phase (--decode-weights): `If` more than one token in `input_ids` (a
    prompt), the prompt stage's graph, else the decode stage's. Both branches read the model's inputs and the tensors
    they share (one name, one tensor: Stage.add) from the outer graph; each keeps its own layers. Inputs, outputs and
    header from `skeleton`: what onnxruntime, onnxruntime-genai and optimum see is the model as exported."""
    proto = _header(skeleton, metadata)
    graph = skeleton.graph
    outputs = [str(v.name) for v in graph.outputs]
    ends = {str(v.name) for v in graph.inputs}
    branches = []
    opsets: dict[str, int] = {}
    for name, blocks in (("prompt", prompt), ("decode", decode)):
        branch = onnx.GraphProto(name=name)
        opsets.update(_link(branch, blocks, ends | set(outputs)))
        made = {value for node in branch.node for value in node.output}
        if not made >= set(outputs):
            raise AssertionError(f"internal error: the {name} stage computes none of {sorted(set(outputs) - made)}")
        _rename(branch, {output: f"{output}/{name}" for output in outputs})
        for declared in proto.graph.output:
            branch.output.append(declared)
            branch.output[-1].name = f"{declared.name}/{name}"
        branches.append(branch)
    then, otherwise = branches
    names = {t.name for t in otherwise.initializer}
    common = [t for t in then.initializer if t.name in names]
    proto.graph.initializer.extend(common)
    hoisted = {t.name for t in common}
    for branch in branches:
        kept = [t for t in branch.initializer if t.name not in hoisted]
        del branch.initializer[:]
        branch.initializer.extend(kept)
    one = onnx.numpy_helper.from_array(np.array([1], np.int64), "sqonnx/phase/one")  # the sequence axis, one token
    proto.graph.initializer.append(one)
    proto.graph.node.extend([
        onnx.helper.make_node("Shape", [PHASE_INPUT], ["sqonnx/phase/shape"], "sqonnx/phase/shape"),
        onnx.helper.make_node("Gather", ["sqonnx/phase/shape", one.name], ["sqonnx/phase/tokens"],
                              "sqonnx/phase/tokens", axis=0),
        onnx.helper.make_node("Greater", ["sqonnx/phase/tokens", one.name], ["sqonnx/phase/prompt"],
                              "sqonnx/phase/is_prompt"),
        onnx.helper.make_node("If", ["sqonnx/phase/prompt"], outputs, "sqonnx/phase", then_branch=then,
                              else_branch=otherwise,
                              doc_string="prompt (more than one token): W8A8; decode (one token): the decode stage"),
    ])
    _opsets(proto, skeleton, opsets)
    return proto


def _rename(graph: onnx.GraphProto, names: dict[str, str]) -> None:
    for node in graph.node:
        for values in (node.input, node.output):
            for i, value in enumerate(values):
                if value in names:
                    values[i] = names[value]
    kept = [info for info in graph.value_info if info.name not in names]
    del graph.value_info[:]
    graph.value_info.extend(kept)


def _header(skeleton: ir.Model, metadata: dict[str, str]) -> onnx.ModelProto:
    """A model with `skeleton`'s header, metadata and functions, and its graph's name, inputs and outputs."""
    proto = onnx.ModelProto()
    proto.ir_version = skeleton.ir_version
    proto.producer_name = skeleton.producer_name or ""
    proto.producer_version = skeleton.producer_version or ""
    if skeleton.domain:
        proto.domain = skeleton.domain
    if skeleton.model_version is not None:
        proto.model_version = skeleton.model_version
    if skeleton.doc_string:
        proto.doc_string = skeleton.doc_string
    proto.functions.extend(ir.serde.serialize_function(f) for f in skeleton.functions.values())
    for key, value in {**skeleton.metadata_props, **metadata}.items():
        prop = proto.metadata_props.add()
        prop.key, prop.value = key, value
    graph = skeleton.graph
    proto.graph.name = graph.name or "main_graph"
    proto.graph.input.extend(ir.serde.serialize_value(v) for v in graph.inputs)
    proto.graph.output.extend(ir.serde.serialize_value(v) for v in graph.outputs)
    return proto


def _link(graph: onnx.GraphProto, blocks: list[ir.Model], ends: set[str]) -> dict[str, int]:
    """The blocks' nodes, initializers and value infos into `graph` (each name once; `ends`: the model's inputs and
    outputs, declared by the model). Returns the opsets the blocks import."""
    opsets: dict[str, int] = {}
    initializers: set[str] = set()
    infos: set[str] = set(ends)
    for block in blocks:
        part = ir.serde.serialize_model(block)
        for opset in part.opset_import:
            opsets.setdefault(opset.domain, opset.version)
        graph.node.extend(part.graph.node)
        for tensor in part.graph.initializer:
            if tensor.name not in initializers:
                initializers.add(tensor.name)
                graph.initializer.append(tensor)
        for info in (*part.graph.input, *part.graph.output, *part.graph.value_info):
            if info.name not in infos:
                infos.add(info.name)
                graph.value_info.append(info)
    return opsets


def _opsets(proto: onnx.ModelProto, skeleton: ir.Model, found: dict[str, int]) -> None:
    opsets = dict(skeleton.graph.opset_imports)
    for domain, version in found.items():
        opsets.setdefault(domain, version)
    for domain, version in sorted(opsets.items()):
        entry = proto.opset_import.add()
        entry.domain, entry.version = domain, version


STAGING_PREFIX = ".sqonnx-"
_DIGEST_CHARS = 16


def stale_data_files(output_path: Path, keep: str | None) -> list[Path]:
    """Data files an earlier save of `output_path` left that the current .onnx no longer refers to."""
    pattern = re.compile(re.escape(output_path.name) + rf"\.[0-9a-f]{{{_DIGEST_CHARS}}}\.data")
    return [p for p in output_path.parent.iterdir() if pattern.fullmatch(p.name) and p.name != keep]


def remove_stale_staging(folder: Path) -> None:
    """Remove staging folders of sqonnx processes that were killed (SIGKILL, power loss) while saving here.

    The owner's process id is in the folder's name; a folder whose owner still runs on this machine (another
    save into the same folder right now) is left alone.
    """
    for path in folder.glob(f"{STAGING_PREFIX}*"):
        owner = path.name[len(STAGING_PREFIX):].split("-", 1)[0]
        if path.is_dir() and owner.isdigit() and not _running(int(owner)):
            shutil.rmtree(path, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, but belongs to someone else
        return True
    return True


@contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive lock on the output folder while files are moved into it (released if the process dies)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock; a single writer is still safe
        yield
        return
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)
