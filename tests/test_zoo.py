"""Sanity of the family zoo (models/zoo.py): each export exists, runs, matches its PyTorch model, and has the
trained-like properties the smoothing tests rely on (outlier channels in every norm, no shared weights)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from models import zoo

pytest.importorskip("optimum.exporters.onnx", reason="the zoo is exported with optimum-onnx (the `export` extra)")


def _norm_scales(model: onnx.ModelProto, hidden: int) -> dict[str, np.ndarray]:
    """Hidden-size norm scales by reader node: LayerNormalization's scale, or the constant of RMSNorm's
    final Mul (optimum exports RMSNorm as Pow/ReduceMean/Add/Sqrt/Div/Mul then Mul by the weight)."""
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    scales = {}
    for node in model.graph.node:
        if node.op_type == "LayerNormalization":
            scales[node.name] = inits[node.input[1]]
        elif node.op_type == "Mul" and "norm" in node.name.lower():
            for name in node.input:
                if name in inits and inits[name].shape == (hidden,):
                    scales[node.name] = inits[name]
    return scales


@pytest.mark.parametrize("family", zoo.pytest_params())
def test_export_is_small_and_runs(family: str) -> None:
    path = zoo.build(family)
    assert path.exists() and (path.parent / "config.json").exists()
    assert sum(p.stat().st_size for p in path.parent.iterdir()) < 2e6
    feeds = zoo.feeds(path, samples=2, seq=8, seed=0)
    out = zoo.logits(path, feeds)
    assert out.shape[:2] == (2, 8)
    assert np.all(np.isfinite(out))


@pytest.mark.parametrize("family", zoo.pytest_params())
def test_weights_are_trained_like(family: str) -> None:
    """Every hidden-size norm has the planted outliers, and optimum deduplicated nothing (no Identity)."""
    model = onnx.load(str(zoo.build(family)))
    hidden = 64
    scales = _norm_scales(model, hidden)
    assert len(scales) >= 3, f"found norms {sorted(scales)}"
    for name, scale in scales.items():
        ratio = np.abs(scale).max() / np.median(np.abs(scale))
        assert ratio > 10, f"{name}: max/median {ratio:.1f}"
        assert set(np.argsort(-np.abs(scale))[:3].tolist()) == set(zoo.OUTLIER_CHANNELS), name
    assert not [n.name for n in model.graph.node if n.op_type == "Identity"]


@pytest.mark.parametrize("family", zoo.pytest_params())
def test_onnx_matches_pytorch(family: str) -> None:
    """The export computes the seeded PyTorch model (for Mixtral: the dense MoE equals the sparse routing)."""
    torch = pytest.importorskip("torch")
    path = zoo.build(family)
    feeds = zoo.feeds(path, samples=2, seq=8, seed=1)
    model = zoo.make_model(family)
    with torch.no_grad():
        outputs = [model(**{k: torch.from_numpy(v) for k, v in feed.items()}) for feed in feeds]
    expected = np.concatenate([(o.logits if hasattr(o, "logits") else o.last_hidden_state).numpy() for o in outputs])
    got = zoo.logits(path, feeds)
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()


@pytest.mark.zoo
def test_save_npz_layout(tmp_path: Path) -> None:
    """The --calib-data archive: one array per model input, samples on axis 0, each sample [1, seq]."""
    path = zoo.build("llama")
    archive = np.load(zoo.save_npz(path, tmp_path / "calib.npz", samples=3, seq=8, seed=0))
    assert sorted(archive.files) == ["attention_mask", "input_ids", "position_ids"]
    assert all(archive[name].shape == (3, 1, 8) for name in archive.files)
    assert archive["input_ids"].dtype == np.int64
