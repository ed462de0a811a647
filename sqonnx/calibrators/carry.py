"""The values that cross block borders, per calibration run, kept between one block and the next.

Each run of the model (a calibration sample, or one step of a decode chain) leaves, at every border, the
residual stream and what later blocks read besides it (mask, rotary tables, position ids). They stay in
memory up to a budget; beyond it they go to files in a scratch folder, written and read with plain file I/O
(not memory-mapped: mapped pages would count in the process's resident memory until the kernel evicts
them). A value is dropped once the last block that reads it is done, so the folder holds about one border's
worth: 16 samples x 256 tokens x 4096 floats = 64 MB at Llama-2-7B's width.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from sqonnx.errors import SqonnxError

Key = tuple[int, int]  # (sequence, step): a sample, or a step of a decode chain


class Carry:
    def __init__(self, folder: Path, memory_budget: int) -> None:
        self.folder = folder
        self.memory_budget = memory_budget
        self._memory: dict[tuple[Key, str], np.ndarray] = {}
        self._files: dict[tuple[Key, str], Path] = {}
        self._memory_bytes = 0
        self._disk_bytes = 0
        self._written = 0

    def put(self, key: Key, name: str, array: np.ndarray) -> None:
        self.discard(key, name)
        if self._memory_bytes + array.nbytes <= self.memory_budget:
            self._memory[(key, name)] = array
            self._memory_bytes += array.nbytes
            return
        self._written += 1
        path = self.folder / f"carry-{key[0]}-{key[1]}-{self._written}.npy"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with open(path, "wb") as handle:
                np.save(handle, np.ascontiguousarray(array), allow_pickle=False)
        except OSError as exc:
            path.unlink(missing_ok=True)
            free = shutil.disk_usage(self.folder).free if self.folder.exists() else 0
            raise SqonnxError(f"cannot write calibration activations in {self.folder}: {exc.strerror} "
                              f"({array.nbytes / 1e6:.0f} MB needed, {free / 1e6:.0f} MB free); free some space "
                              "there or write the output elsewhere") from None
        self._files[(key, name)] = path
        self._disk_bytes += array.nbytes

    def get(self, key: Key, name: str) -> np.ndarray:
        found = self._memory.get((key, name))
        if found is not None:
            return found
        path = self._files[(key, name)]
        with open(path, "rb") as handle:
            return np.load(handle, allow_pickle=False)

    def has(self, key: Key, name: str) -> bool:
        return (key, name) in self._memory or (key, name) in self._files

    def discard(self, key: Key, name: str) -> None:
        array = self._memory.pop((key, name), None)
        if array is not None:
            self._memory_bytes -= array.nbytes
        path = self._files.pop((key, name), None)
        if path is not None:
            self._disk_bytes -= os.path.getsize(path) if path.exists() else 0
            path.unlink(missing_ok=True)

    def drop(self, names: set[str]) -> None:
        """Forget every run's values of `names` (their last reader is done)."""
        for key, name in [k for k in (*self._memory, *self._files) if k[1] in names]:
            self.discard(key, name)

    def copy_from(self, other: Carry) -> None:
        """Every value `other` holds now, as this carry's own (arrays are shared: nothing writes into them)."""
        for key, name in other.entries():
            self.put(key, name, other.get(key, name))

    def entries(self) -> list[tuple[Key, str]]:
        """Every (run key, value name) held."""
        return sorted({*self._memory, *self._files})

    def clear(self) -> None:
        for key, name in [*self._memory, *self._files]:
            self.discard(key, name)
