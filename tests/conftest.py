from __future__ import annotations

from pathlib import Path

import pytest

from tests.synthetic import activations, build_block, save_feeds


@pytest.fixture
def block(tmp_path: Path) -> Path:
    return build_block(tmp_path / "block.onnx")


@pytest.fixture
def feeds(tmp_path: Path) -> Path:
    return save_feeds(tmp_path / "feeds.npz", activations(8))
