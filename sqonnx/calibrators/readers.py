"""Calibration samples as onnxruntime users hold them: an `onnxruntime.quantization.CalibrationDataReader` (its
`get_next()` gives a feed dict per sample, None at the end) or any iterable of feed dicts.

They are read once, as far as the run uses them (`--num-samples`), stacked per input along a new first axis and
written as an .npz in the run's scratch folder; from there they take the very path of `--calib-data FILE.npz`: the
same validation and one-line errors (the input names, ranks, shapes and types the model takes, no NaN), the same
streaming through the blocks, and the same bytes out for the same samples (`tests/test_api_routes.py`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from itertools import islice
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from sqonnx.errors import SqonnxError


class SampleReader(Protocol):
    """onnxruntime's CalibrationDataReader protocol (onnxruntime is not imported for the type)."""

    def get_next(self) -> Mapping[str, Any] | None: ...


def is_sample_source(source: object) -> bool:
    """A reader or an iterable of feed dicts (not a path, nor several paths)."""
    if source is None or isinstance(source, (str, Path, bytes)):
        return False
    if hasattr(source, "get_next"):
        return True
    if isinstance(source, (list, tuple)) and source and all(isinstance(item, (str, Path)) for item in source):
        return False  # several calibration files
    return isinstance(source, Iterable)


def save_samples(source: Any, folder: Path, limit: int) -> Path:
    """The first `limit` samples of `source` as one .npz in `folder` (named after the source, which the errors of
    `--calib-data` then name)."""
    what = f"{type(source).__name__}.get_next()" if hasattr(source, "get_next") else "calibration iterable"
    samples = list(_take(source, limit, what))
    if not samples:
        raise SqonnxError(f"the {what} gave no samples; give at least one feed dict (input name -> array)")
    names = sorted(samples[0])
    for index, sample in enumerate(samples):
        if sorted(sample) != names:
            raise SqonnxError(f"calibration sample {index} from the {what} has inputs {sorted(sample)}, sample 0 has "
                              f"{names}; give every sample the same inputs")
    arrays: dict[str, np.ndarray] = {}
    for name in names:
        values = [np.asarray(sample[name]) for sample in samples]
        for index, value in enumerate(values):
            if value.dtype == object:
                raise SqonnxError(f"input '{name}' of calibration sample {index} from the {what} is not numeric; "
                                  "give numpy arrays")
            if value.shape != values[0].shape or value.dtype != values[0].dtype:
                raise SqonnxError(f"input '{name}' of calibration sample {index} from the {what} is {value.dtype} "
                                  f"{list(value.shape)}, sample 0's is {values[0].dtype} {list(values[0].shape)}; "
                                  "sqonnx stacks the samples: give every sample one shape (pad or cut to one length)")
        arrays[name] = np.stack(values)
    stem = type(source).__name__ if hasattr(source, "get_next") else "feeds"
    path = folder / f"{stem}.npz"
    np.savez(path, **arrays)
    return path


def _take(source: Any, limit: int, what: str) -> Iterator[Mapping[str, Any]]:
    if hasattr(source, "get_next"):
        items: Iterator[Any] = iter(source.get_next, None)
    else:
        try:
            items = iter(source)
        except TypeError:
            raise SqonnxError(f"calibration must be a path, several paths, an onnxruntime CalibrationDataReader or "
                              f"an iterable of feed dicts, not a {type(source).__name__}") from None
    for index, item in enumerate(islice(items, limit)):
        if not isinstance(item, Mapping):
            raise SqonnxError(f"calibration sample {index} from the {what} is a {type(item).__name__}, not a dict of "
                              "input name -> array")
        yield item
