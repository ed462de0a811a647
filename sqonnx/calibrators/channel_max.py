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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from sqonnx.errors import SqonnxError
from sqonnx.graph import add_initializer

logger = logging.getLogger(__name__)

FLOAT16_MAX = 65504.0
ROW_SAMPLES = 8  # rows are kept from this many samples (different texts), evenly spaced in each


@dataclass
class ActivationStats:
    """What calibration keeps: per-channel max|x| over all samples, and (when asked) a few whole rows
    (tokens) of each activation, float16, for the searches that need real values (alpha, clipping)."""

    channel_max: dict[str, np.ndarray]
    rows: dict[str, np.ndarray] = field(default_factory=dict)


def collect_channel_max(model: ir.Model, activations: dict[str, int], feeds: Iterable[dict[str, np.ndarray]],
                        total: int, progress: bool = True) -> dict[str, np.ndarray]:
    """max|x| per channel for each activation name -> channel count, over all samples of `feeds`."""
    return collect_statistics(model, activations, feeds, total, progress).channel_max


def collect_statistics(model: ir.Model, activations: dict[str, int], feeds: Iterable[dict[str, np.ndarray]],
                       total: int, progress: bool = True, keep_rows: int = 0) -> ActivationStats:
    """Channel maxima over all samples, plus `keep_rows` rows per activation taken evenly from the
    first ROW_SAMPLES samples (memory: keep_rows x channels x 2 bytes per activation)."""
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
    row_outputs: list[ir.Value] = []
    if keep_rows:
        for name in activations:
            if not values[name].is_graph_output() and not values[name].is_graph_input():
                graph.outputs.append(values[name])
                row_outputs.append(values[name])
    try:
        with tempfile.TemporaryDirectory(prefix="sqonnx-calib-") as tmp:
            path = Path(tmp) / "calibration.onnx"
            try:
                ir.save(model, path, external_data="calibration.onnx.data")
            except OSError as exc:
                raise SqonnxError(f"cannot write the calibration copy of the model in {tmp}: {exc.strerror}; "
                                  "free some space or point TMPDIR elsewhere") from None
            session = _session(path)
            return _run(session, output_names, feeds, total, progress, keep_rows)
    finally:
        for out in row_outputs + added_outputs:
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
         total: int, progress: bool, keep_rows: int = 0) -> ActivationStats:
    names = list(output_names)
    fetch = [output_names[n] for n in names]
    maxima: dict[str, np.ndarray] = {}
    rows: dict[str, list[np.ndarray]] = {name: [] for name in names} if keep_rows else {}
    row_samples = min(ROW_SAMPLES, total)
    per_sample = -(-keep_rows // row_samples) if keep_rows else 0
    from rich.progress import Progress

    with Progress(transient=True, disable=not progress) as bar:
        task = bar.add_task("calibrating", total=total)
        for sample, feed in enumerate(feeds):
            keep = sample < row_samples and per_sample > 0
            from_graph = [name for name in names if name not in feed] if keep else []
            try:
                results = session.run(fetch + from_graph, feed)
            except Exception as exc:
                raise SqonnxError(f"calibration sample {sample} does not fit the model: "
                                  f"{str(exc).splitlines()[0]}") from None
            if keep:
                fetched = dict(zip(from_graph, results[len(names):], strict=True))
                for name in names:
                    activation = fetched[name] if name in fetched else feed[name]
                    flat = activation.reshape(-1, activation.shape[-1])
                    picked = np.linspace(0, len(flat) - 1, min(per_sample, len(flat))).astype(np.int64)
                    rows[name].append(np.clip(flat[picked], -FLOAT16_MAX, FLOAT16_MAX).astype(np.float16))
                results = results[:len(names)]
            for name, result in zip(names, results, strict=True):
                if not np.all(np.isfinite(result)):
                    raise SqonnxError(f"activation '{name}' is NaN or infinite on calibration sample {sample}; "
                                      "check the calibration data")
                previous = maxima.get(name)
                maxima[name] = result if previous is None else np.maximum(previous, result)
            bar.advance(task)
    return ActivationStats(maxima, {name: np.concatenate(parts)[:keep_rows] for name, parts in rows.items() if parts})
