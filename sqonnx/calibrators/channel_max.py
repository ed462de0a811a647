"""Per-channel max|x| of chosen activations, recorded while onnxruntime runs the FP model.

Instead of fetching whole activations ([batch, seq, hidden] per layer per sample), the calibrator adds
Abs -> Reshape([-1, C]) -> ReduceMax(axis 0) for each one, so onnxruntime hands back C numbers per
tensor and memory stays flat however many samples run. Channels are the last axis of transformer
activations (onnxruntime's own calibrator assumes axis 1, the image layout).

A sample is a feed dict, or a `DecodeChain` that the same session drives (its prompt, then one token at a
time on the cache the previous run returned): every run adds to the maxima; rows and probes come from
feed dicts only.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from sqonnx.calibrators.data import DecodeChain
from sqonnx.calibrators.probes import Probe, add_probe, read_map
from sqonnx.errors import SqonnxError
from sqonnx.graph import add_initializer
from sqonnx.pause import pause_point

logger = logging.getLogger(__name__)

FLOAT16_MAX = 65504.0
ROW_SAMPLES = 8  # rows are kept from this many samples (different texts), evenly spaced in each


@dataclass
class ActivationStats:
    """What calibration keeps: per-channel max|x| over all samples, and (when asked) a few whole rows
    (tokens) of each activation, float16, for the searches that need real values (alpha, clipping)."""

    channel_max: dict[str, np.ndarray]
    rows: dict[str, np.ndarray] = field(default_factory=dict)
    maps: dict[str, np.ndarray] = field(default_factory=dict)  # probe name -> column per channel (see probes)


Sample = dict[str, np.ndarray] | DecodeChain


def collect_channel_max(model: ir.Model, activations: dict[str, int], feeds: Iterable[Sample],
                        total: int, progress: bool = True) -> dict[str, np.ndarray]:
    """max|x| per channel for each activation name -> channel count, over all samples of `feeds`."""
    return collect_statistics(model, activations, feeds, total, progress).channel_max


def collect_statistics(model: ir.Model, activations: dict[str, int], feeds: Iterable[Sample],
                       total: int, progress: bool = True, keep_rows: int = 0,
                       probes: Sequence[Probe] = ()) -> ActivationStats:
    """Channel maxima over all samples, plus `keep_rows` rows per activation taken evenly from the
    first ROW_SAMPLES samples (memory: keep_rows x channels x 2 bytes per activation), plus the channel
    map of each probe, read on the first sample."""
    graph = model.graph
    # ReduceMax takes its axes as an input from opset 18 on, as an attribute before.
    axes_as_input = graph.opset_imports.get("", 0) >= 18
    values = {str(v.name): v for node in graph for v in node.inputs if v is not None}
    values.update({str(v.name): v for v in graph.inputs})
    added_nodes: list[ir.Node] = []
    added_outputs: list[ir.Value] = []
    initializers_before = set(graph.initializers)
    output_names: dict[str, str] = {}
    for index, (name, channels) in enumerate(activations.items()):
        value = values[name]
        shape = add_initializer(graph, f"sqonnx_calib_shape_{index}", np.array([-1, channels], np.int64))
        absolute = ir.Node("", "Abs", [value], name=f"sqonnx_calib_abs_{index}")
        flat = ir.Node("", "Reshape", [absolute.outputs[0], shape], name=f"sqonnx_calib_reshape_{index}")
        attributes: dict[str, ir.Attr] = {"keepdims": ir.AttrInt64("keepdims", 0)}
        reduce_inputs = [flat.outputs[0]]
        if axes_as_input:
            axes = add_initializer(graph, f"sqonnx_calib_axes_{index}", np.array([0], np.int64))
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
    probe_outputs: dict[str, list[str]] = {}
    for index, probe in enumerate(probes):
        nodes, outputs = add_probe(graph, probe, index, axes_as_input)
        added_nodes += nodes
        graph.outputs.extend(outputs)
        added_outputs += outputs
        probe_outputs[probe.name] = [str(v.name) for v in outputs]
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
            stats, probed = _run(session, output_names, feeds, total, progress, keep_rows, probe_outputs)
    finally:
        for out in row_outputs + added_outputs:
            graph.outputs.remove(out)
        graph.remove(added_nodes, safe=True)
        for name in [name for name in graph.initializers if name not in initializers_before]:
            graph.initializers.pop(name)
    for probe in probes:
        found = read_map(probe, *probed[probe.name]) if probe.name in probed else None
        if found is None:
            logger.info("no clean channel map for %s", probe.name)
        else:
            stats.maps[probe.name] = found
    return stats


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    # Fatal only: a sample that does not fit the model is reported as one error line (below), not also as
    # onnxruntime's own log line on stderr.
    options.log_severity_level = 4
    # Pre-packed copies of the weights cost memory (~200 MB on SmolLM2) and calibration is not latency-bound.
    options.add_session_config_entry("session.disable_prepacking", "1")
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise SqonnxError(f"onnxruntime cannot run the model for calibration: {str(exc).splitlines()[0]}") from None


def _run(session: ort.InferenceSession, output_names: dict[str, str], feeds: Iterable[Sample],
         total: int, progress: bool, keep_rows: int = 0, probe_outputs: dict[str, list[str]] | None = None,
         ) -> tuple[ActivationStats, dict[str, list[np.ndarray]]]:
    names = list(output_names)
    fetch = [output_names[n] for n in names]
    probe_outputs = probe_outputs or {}
    probe_fetch = [name for outputs in probe_outputs.values() for name in outputs]
    probed: dict[str, list[np.ndarray]] = {}
    maxima: dict[str, np.ndarray] = {}
    rows: dict[str, list[np.ndarray]] = {name: [] for name in names} if keep_rows else {}
    row_samples = min(ROW_SAMPLES, total)
    per_sample = -(-keep_rows // row_samples) if keep_rows else 0
    from rich.progress import Progress

    with Progress(transient=True, disable=not progress) as bar:
        task = bar.add_task("calibrating", total=total)
        for sample, feed in enumerate(feeds):
            if isinstance(feed, DecodeChain):
                _decode(session, feed, names, fetch, maxima, sample)
                bar.advance(task)
                continue
            keep = sample < row_samples and per_sample > 0
            from_graph = [name for name in names if name not in feed] if keep else []
            # Probes read the first sample only: later ones may be decode-shaped (a non-empty cache
            # joins the labels with unlabelled past tokens).
            extra = probe_fetch if sample == 0 else []
            results = _session_run(session, fetch + from_graph + extra, feed, f"calibration sample {sample}")
            if extra:
                values = iter(results[len(results) - len(extra):])
                probed = {name: [next(values) for _ in outputs] for name, outputs in probe_outputs.items()}
                results = results[:len(results) - len(extra)]
            if keep:
                fetched = dict(zip(from_graph, results[len(names):], strict=True))
                for name in names:
                    activation = fetched[name] if name in fetched else feed[name]
                    flat = activation.reshape(-1, activation.shape[-1])
                    picked = np.linspace(0, len(flat) - 1, min(per_sample, len(flat))).astype(np.int64)
                    rows[name].append(np.clip(flat[picked], -FLOAT16_MAX, FLOAT16_MAX).astype(np.float16))
                results = results[:len(names)]
            _add_maxima(maxima, names, results, f"calibration sample {sample}")
            bar.advance(task)
            if sample == 0:
                pause_point("calibration")
    kept = {name: np.concatenate(parts)[:keep_rows] for name, parts in rows.items() if parts}
    return ActivationStats(maxima, kept), probed


def _decode(session: ort.InferenceSession, chain: DecodeChain, names: list[str], fetch: list[str],
            maxima: dict[str, np.ndarray], sample: int) -> None:
    """Run `chain`'s prompt, then its single tokens, each fed the cache the run before returned."""
    feed = chain.prompt
    for step in range(chain.steps + 1):
        where = f"calibration sample {sample} (decode step {step}; --decode-steps 0 calibrates prefill only)"
        results = _session_run(session, fetch + chain.fetch, feed, where)
        _add_maxima(maxima, names, results[:len(fetch)], where)
        if step < chain.steps:
            feed = chain.next_feeds(feed, dict(zip(chain.fetch, results[len(fetch):], strict=True)), step)


def _session_run(session: ort.InferenceSession, fetch: list[str], feed: dict[str, np.ndarray],
                 where: str) -> list[np.ndarray]:
    try:
        return session.run(fetch, feed)
    except Exception as exc:
        raise SqonnxError(f"{where} does not fit the model: {str(exc).splitlines()[0]}") from None


def _add_maxima(maxima: dict[str, np.ndarray], names: list[str], results: list[np.ndarray], where: str) -> None:
    for name, result in zip(names, results, strict=True):
        if not np.all(np.isfinite(result)):
            raise SqonnxError(f"activation '{name}' is NaN or infinite on {where}; check the calibration data")
        previous = maxima.get(name)
        maxima[name] = result if previous is None else np.maximum(previous, result)
