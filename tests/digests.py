"""Digests of what sqonnx writes, recorded once and compared afterwards (see tests/test_digests.py)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

DIGESTS = Path(__file__).with_name("digests.json")
RECORD = os.environ.get("SQONNX_RECORD_DIGESTS") == "1"


def file_digest(*paths: Path) -> str:
    """sha256 over the files' names and bytes, in order (read in chunks: SmolLM2's data file is 540 MB)."""
    sha = hashlib.sha256()
    for path in paths:
        sha.update(path.name.encode() + b"\0")
        with path.open("rb") as file:
            while chunk := file.read(1 << 24):
                sha.update(chunk)
    return sha.hexdigest()


def output_digest(folder: Path) -> str:
    """Every file sqonnx wrote into `folder` (the model, its data file, companions)."""
    return file_digest(*sorted(p for p in folder.iterdir() if p.is_file()))


def environment() -> dict[str, str]:
    """What the output's bytes depend on besides sqonnx: onnxruntime's version and the CPU's vector ISA."""
    import onnxruntime

    flags = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        line = next((ln for ln in cpuinfo.read_text().splitlines() if ln.startswith("flags")), "")
        flags = " ".join(f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni") if f" {f}" in line)
    return {"onnxruntime": onnxruntime.__version__, "cpu": flags}


def check_digest(case: str, inputs: list[Path], output_folder: Path) -> None:
    """Compare (or, with SQONNX_RECORD_DIGESTS=1, record) `case`'s output digest."""
    recorded = json.loads(DIGESTS.read_text()) if DIGESTS.exists() else {}
    entry = {"input": file_digest(*inputs), "output": output_digest(output_folder), **environment()}
    if RECORD:
        recorded[case] = entry
        DIGESTS.write_text(json.dumps(recorded, indent=1, sort_keys=True) + "\n")
        return
    if case not in recorded:
        pytest.fail(f"no digest recorded for {case}: run SQONNX_RECORD_DIGESTS=1 pytest tests/test_digests.py")
    expected = recorded[case]
    differs = [key for key in ("input", "onnxruntime", "cpu") if expected[key] != entry[key]]
    if differs:
        changes = ", ".join(f"{key} {expected[key]!r} now {entry[key]!r}" for key in differs)
        pytest.skip(f"{case}: recorded with another {changes}; the digest says nothing here")
    assert entry["output"] == expected["output"], f"{case}: sqonnx wrote other bytes than the recorded run"
