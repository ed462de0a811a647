"""`--cache-dir`: each finished block's calibration statistics and the values entering the next block, on disk,
so that a killed run resumes where it stopped and a rerun with other choices skips the forward passes.

Calibration statistics depend on the model, the samples and the few options that change what runs through the
model (rotation, the cut into blocks, the samples held back, decode steps); not on α, the level, the target,
the form or --exclude: every group's statistics and rows are kept, whatever the run needs. With `--sequential`
each block is calibrated on the INT8 output of the block before, so the statistics depend on every
quantization option too, and the key holds them all. A cache made under another key is refused in one line.

Layout: `manifest.json` (the key), `block-NNNN.npz` (statistics of block N), `carry-NNNN/` (every value alive
after block N, per run: the residual stream and the mask, rotary tables, ... later blocks read), `references/`
(the FP model's outputs for the samples the quality check compares), `tokens.npz` (the decode chains' generated
tokens). Files are written under a temporary name and renamed, so a run killed
while writing leaves nothing that looks finished; only the newest carry folder is kept.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sqonnx.calibrators.carry import Carry
from sqonnx.calibrators.channel_max import ActivationStats
from sqonnx.errors import SqonnxError

MANIFEST = "manifest.json"
FORMAT = 1


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def model_identity(model_path: Path, data_files: list[Path]) -> str:
    """The .onnx file's bytes, and each external data file's size and modification time (hashing 27 GB of
    weights would take minutes; a rewritten data file has a new time)."""
    parts = [file_digest(model_path)]
    for path in sorted(data_files):
        stat = path.stat()
        parts.append(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def data_identity(data: Path | tuple[Path, ...] | None) -> str:
    if isinstance(data, tuple) or (data is not None and data.is_dir()):
        from sqonnx.calibrators.data import data_sources

        return "+".join(data_identity(source) for source in data_sources(data))
    if data is None:
        from sqonnx.calibrators.data import pydoc_text

        return "pydoc:" + hashlib.sha256(pydoc_text("calibration").encode()).hexdigest()[:16] + f":{sys.version}"
    return f"{data.name}:{file_digest(data)}"


@dataclass
class CalibrationCache:
    folder: Path

    @classmethod
    def open(cls, folder: Path, key: dict[str, str]) -> CalibrationCache:
        """The cache in `folder`, created if empty; refused (one line) if it was made under another key."""
        if folder.exists() and not folder.is_dir():
            raise SqonnxError(f"--cache-dir {folder} is a file; give a folder")
        manifest = folder / MANIFEST
        if manifest.exists():
            try:
                found = json.loads(manifest.read_text())
            except (OSError, ValueError):
                found = {}
            if found.get("format") != FORMAT or found.get("key") != key:
                old = found.get("key", {}) if isinstance(found.get("key"), dict) else {}
                what = [name for name in key if old.get(name) != key[name]] or ["its format"]
                raise SqonnxError(f"--cache-dir {folder} holds calibration of another {', '.join(what)}; "
                                  "give an empty folder, or delete this one")
        elif folder.exists() and any(folder.iterdir()):
            raise SqonnxError(f"--cache-dir {folder} is not empty and holds no sqonnx calibration cache; give an "
                              "empty or new folder")
        try:
            folder.mkdir(parents=True, exist_ok=True)
            _write_text(manifest, json.dumps({"format": FORMAT, "key": key}, indent=1))
        except OSError as exc:
            raise SqonnxError(f"cannot write --cache-dir {folder}: {exc.strerror}") from None
        return cls(folder)

    def stats(self, index: int) -> ActivationStats | None:
        path = self.folder / f"block-{index:04d}.npz"
        if not path.exists():
            return None
        try:
            return ActivationStats.load(path)
        except (OSError, ValueError, KeyError) as exc:
            raise SqonnxError(f"--cache-dir {self.folder} is damaged ({type(exc).__name__} reading {path.name}); "
                              "delete it") from None

    def save_stats(self, index: int, stats: ActivationStats) -> None:
        self._atomic(self.folder / f"block-{index:04d}.npz", stats.save)

    def resume_after(self, blocks: int, limit: int | None = None) -> int:
        """The last block (at most `limit`) whose statistics and carried values are both kept (-1: none): a run
        resumes after it."""
        for index in range(min(blocks - 1, limit if limit is not None else blocks - 1), -1, -1):
            if (self.folder / f"carry-{index:04d}").is_dir() and all(
                    (self.folder / f"block-{i:04d}.npz").exists() for i in range(index + 1)):
                return index
        return -1

    def save_carry(self, index: int, carry: Carry, keep: int | None = None) -> None:
        """Every value alive after block `index`. Carry folders of earlier blocks are removed but `keep`'s (the
        block before the one that makes the model's output, where a run that compares outputs resumes)."""
        target = self.folder / f"carry-{index:04d}"
        self._save_folder(target, carry)
        for old in self.folder.glob("carry-*"):
            if old != target and old.name != f"carry-{keep if keep is not None else -1:04d}":
                shutil.rmtree(old, ignore_errors=True)

    def save_references(self, carry: Carry) -> None:
        """The FP model's outputs for the samples a run compares with (the quality check's, --alpha auto's): with
        them a rerun needs no forward pass at all."""
        self._save_folder(self.folder / "references", carry)

    def references(self) -> set[int]:
        """The samples whose FP outputs are kept."""
        try:
            return {int(entry[0]) for entry in json.loads((self.folder / "references" / "index.json").read_text())}
        except (OSError, ValueError, TypeError, IndexError):
            return set()

    def load_references(self, carry: Carry) -> None:
        self._load_folder(self.folder / "references", carry)

    def _save_folder(self, target: Path, carry: Carry) -> None:
        temporary = target.with_name(f".{target.name}.partial")
        shutil.rmtree(temporary, ignore_errors=True)
        try:
            temporary.mkdir()
            entries = []
            for number, (key, name) in enumerate(carry.entries()):
                np.save(temporary / f"{number}.npy", carry.get(key, name), allow_pickle=False)
                entries.append([key[0], key[1], name])
            _write_text(temporary / "index.json", json.dumps(entries))
            shutil.rmtree(target, ignore_errors=True)
            os.replace(temporary, target)
        except OSError as exc:
            shutil.rmtree(temporary, ignore_errors=True)
            raise SqonnxError(f"cannot write --cache-dir {self.folder}: {exc.strerror}") from None

    def load_carry(self, index: int, carry: Carry) -> None:
        self._load_folder(self.folder / f"carry-{index:04d}", carry)

    def _load_folder(self, folder: Path, carry: Carry) -> None:
        try:
            for number, (sequence, step, name) in enumerate(json.loads((folder / "index.json").read_text())):
                carry.put((int(sequence), int(step)), str(name),
                          np.load(folder / f"{number}.npy", allow_pickle=False))
        except (OSError, ValueError, TypeError) as exc:
            raise SqonnxError(f"--cache-dir {self.folder} is damaged ({type(exc).__name__} reading {folder.name}); "
                              "delete it") from None

    def tokens(self, name: str = "tokens") -> list[np.ndarray] | None:
        """Tokens the FP model wrote: the decode chains' (`tokens`), its sampled text (`sampled`)."""
        path = self.folder / f"{name}.npz"
        if not path.exists():
            return None
        with np.load(path) as archive:
            return [archive[f"chain{i}"] for i in range(len(archive.files))]

    def save_tokens(self, tokens: list[np.ndarray], name: str = "tokens") -> None:
        self._atomic(self.folder / f"{name}.npz",
                     lambda temporary: np.savez(temporary, **{f"chain{i}": t for i, t in enumerate(tokens)}))

    def _atomic(self, path: Path, write: object) -> None:
        temporary = path.with_name(f".{path.name}.partial")
        try:
            with open(temporary, "wb") as handle:
                write(handle)  # type: ignore[operator]
            os.replace(temporary, path)
        except OSError as exc:
            temporary.unlink(missing_ok=True)
            raise SqonnxError(f"cannot write --cache-dir {self.folder}: {exc.strerror}") from None


def _write_text(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.partial")
    temporary.write_text(text)
    os.replace(temporary, path)
