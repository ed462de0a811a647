"""`sqonnx[olive]`: an Olive workflow JSON with sqonnx's pass, run by Olive's own CLI (`olive run --config
workflow.json --package-config ...`), calibrated through Olive's data config (a user script's dataset and
dataloader): the model Olive writes is byte for byte what `sqonnx.quantize` writes from the same samples, and a bad
option is Olive's error with sqonnx's one-line message."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import sqonnx
from models import zoo
from sqonnx import QuantizeConfig, Target

pytest.importorskip("olive", reason="the Olive pass needs sqonnx[olive] (olive-ai)")
pytestmark = pytest.mark.zoo

USER_SCRIPT = '''
import numpy as np
from olive.data.registry import Registry


@Registry.register_dataset()
def npz_feeds(data_dir=None, path="feeds.npz", **kwargs):
    data = np.load(path)
    return [({name: data[name][i] for name in data.files}, 0) for i in range(len(data["input_ids"]))]


@Registry.register_dataloader()
def feed_dicts(dataset, **kwargs):
    return [feeds for feeds, _ in dataset]
'''


def _workflow(folder: Path, model: Path, options: dict[str, object]) -> Path:
    (folder / "user_script.py").write_text(USER_SCRIPT)
    workflow = {
        "input_model": {"type": "ONNXModel", "model_path": str(model)},
        "data_configs": [{"name": "calib", "user_script": str(folder / "user_script.py"),
                          "load_dataset_config": {"type": "npz_feeds", "params": {"path": str(folder / "feeds.npz")}},
                          "dataloader_config": {"type": "feed_dicts"}}],
        "passes": {"smoothquant": {"type": "SqonnxQuantization", "data_config": "calib", **options}},
        "output_dir": str(folder / "out"), "cache_dir": str(folder / "olive-cache"), "clean_cache": True,
    }
    path = folder / "workflow.json"
    path.write_text(json.dumps(workflow, indent=1))
    return path


def _olive(folder: Path, workflow: Path) -> subprocess.CompletedProcess[str]:
    package = folder / "sqonnx-olive.json"
    made = subprocess.run([sys.executable, "-m", "sqonnx.olive_pass"], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).resolve().parent.parent)
    package.write_text(made.stdout)
    env = {**os.environ, "CI": "1"}  # Olive's telemetry stays off under CI
    return subprocess.run([sys.executable, "-m", "olive", "run", "--config", str(workflow), "--package-config",
                           str(package)], capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=900,
                          cwd=folder, env=env)


def test_olive_workflow_writes_what_sqonnx_writes(tmp_path: Path) -> None:
    model = zoo.build("llama")
    zoo.save_npz(model, tmp_path / "feeds.npz", samples=8, seq=32, seed=0)
    done = _olive(tmp_path, _workflow(tmp_path, model, {"target": "tensorrt", "alpha": 0.5}))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    written = sorted(tmp_path.joinpath("out").rglob("*.onnx"))
    assert len(written) == 1, written
    direct = tmp_path / "direct" / "model.onnx"
    sqonnx.quantize(model, direct, QuantizeConfig(target=Target.TENSORRT), calibration=tmp_path / "feeds.npz")
    assert written[0].read_bytes() == direct.read_bytes()


def test_bad_option_is_oliveS_error_with_sqonnx_line(tmp_path: Path) -> None:
    model = zoo.build("llama")
    np.savez(tmp_path / "feeds.npz", **np.load(zoo.save_npz(model, tmp_path / "f.npz", samples=4, seq=16, seed=0)))
    done = _olive(tmp_path, _workflow(tmp_path, model, {"target": "tpu"}))
    assert done.returncode != 0
    assert "sqonnx: target 'tpu' is not one of portable, native" in done.stdout + done.stderr
