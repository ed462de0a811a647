"""Per-channel max|x| of chosen activations, recorded while onnxruntime runs the FP model.

Instead of fetching whole activations ([batch, seq, hidden] per layer per sample), the calibrator adds
Abs -> Reshape([-1, C]) -> ReduceMax(axis 0) for each one, so onnxruntime hands back C numbers per
tensor and memory stays flat however many samples run. Channels are the last axis of transformer
activations (onnxruntime's own calibrator assumes axis 1, the image layout).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from sqonnx.errors import SqonnxError
from sqonnx.graph import add_initializer

logger = logging.getLogger(__name__)


def collect_channel_max(model: ir.Model, activations: dict[str, int], feeds: Iterable[dict[str, np.ndarray]],
                        total: int, progress: bool = True) -> dict[str, np.ndarray]:
    """max|x| per channel for each activation name -> channel count, over all samples of `feeds`."""
    graph = model.graph
    # ReduceMax takes its axes as an input from opset 18 on, as an attribute before.
    axes_as_input = graph.opset_imports.get("", 0) >= 18
    values = {str(v.name): v for node in graph for v in node.inputs if v is not None}
    values.update({str(v.name): v for v in graph.inputs})
    added_nodes: list[ir.Node] = []
    added_outputs: list[ir.Value] = []
    added_initializers: list[str] = []
    output_names: dict[str, str] = {}
    for index, (name, channels) in enumerate(activations.items()):
        value = values[name]
        shape = add_initializer(graph, f"sqonnx_calib_shape_{index}", np.array([-1, channels], np.int64))
        added_initializers.append(str(shape.name))
        absolute = ir.Node("", "Abs", [value], name=f"sqonnx_calib_abs_{index}")
        flat = ir.Node("", "Reshape", [absolute.outputs[0], shape], name=f"sqonnx_calib_reshape_{index}")
        attributes: dict[str, ir.Attr] = {"keepdims": ir.AttrInt64("keepdims", 0)}
        reduce_inputs = [flat.outputs[0]]
        if axes_as_input:
            axes = add_initializer(graph, f"sqonnx_calib_axes_{index}", np.array([0], np.int64))
            added_initializers.append(str(axes.name))
            reduce_inputs.append(axes)
        else:
            attributes["axes"] = ir.AttrInt64s("axes", [0])
        reduce = ir.Node("", "ReduceMax", reduce_inputs, attributes, name=f"sqonnx_calib_max_{index}")
        out = reduce.outputs[0]
        out.name = f"sqonnx_calib_max_{index}_output"
        out.dtype = ir.DataType.FLOAT
        out.shape = ir.Shape([channels])
        graph.extend([absolute, flat, reduce])
        graph.outputs.append(out)
        added_nodes += [absolute, flat, reduce]
        added_outputs.append(out)
        output_names[name] = str(out.name)
    try:
        with tempfile.TemporaryDirectory(prefix="sqonnx-calib-") as tmp:
            path = Path(tmp) / "calibration.onnx"
            try:
                ir.save(model, path, external_data="calibration.onnx.data")
            except OSError as exc:
                raise SqonnxError(f"cannot write the calibration copy of the model in {tmp}: {exc.strerror}; "
                                  "free some space or point TMPDIR elsewhere") from None
            session = _session(path)
            return _run(session, output_names, feeds, total, progress)
    finally:
        for out in added_outputs:
            graph.outputs.remove(out)
        graph.remove(added_nodes, safe=True)
        for name in added_initializers:
            graph.initializers.pop(name)


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    # Pre-packed copies of the weights cost memory (~200 MB on SmolLM2) and calibration is not latency-bound.
    options.add_session_config_entry("session.disable_prepacking", "1")
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise SqonnxError(f"onnxruntime cannot run the model for calibration: {str(exc).splitlines()[0]}") from None


def _run(session: ort.InferenceSession, output_names: dict[str, str], feeds: Iterable[dict[str, np.ndarray]],
         total: int, progress: bool) -> dict[str, np.ndarray]:
    names = list(output_names)
    fetch = [output_names[n] for n in names]
    maxima: dict[str, np.ndarray] = {}
    from rich.progress import Progress

    with Progress(transient=True, disable=not progress) as bar:
        task = bar.add_task("calibrating", total=total)
        for sample, feed in enumerate(feeds):
            try:
                results = session.run(fetch, feed)
            except Exception as exc:
                raise SqonnxError(f"calibration sample {sample} does not fit the model: "
                                  f"{str(exc).splitlines()[0]}") from None
            for name, result in zip(names, results, strict=True):
                if not np.all(np.isfinite(result)):
                    raise SqonnxError(f"activation '{name}' is NaN or infinite on calibration sample {sample}; "
                                      "check the calibration data")
                previous = maxima.get(name)
                maxima[name] = result if previous is None else np.maximum(previous, result)
            bar.advance(task)
    return maxima
