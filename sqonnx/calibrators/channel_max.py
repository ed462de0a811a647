"""Per-channel max|x| of chosen activations, recorded while onnxruntime runs the FP model (or one block of it).

Instead of fetching whole activations ([batch, seq, hidden] per layer per sample), the calibrator adds
Abs -> Reshape([-1, C]) -> ReduceMax(axis 0) for each one, so onnxruntime hands back C numbers per
tensor and memory stays flat however many samples run. Channels are the last axis of transformer
activations (onnxruntime's own calibrator assumes axis 1, the image layout).

`StatisticsSession` is one session over a block with those outputs added; the caller decides what each run is
fed (a sample's inputs and the values carried from the block before) and what else it fetches. A
half-precision model is run in float32 (sqonnx.runtime.session). The one driver over samples and decode chains is
`streaming.runner.calibrate_block`, whole small models included (they are one block).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from sqonnx.calibrators.data import DecodeChain
from sqonnx.calibrators.probes import Probe, add_probe, read_map
from sqonnx.errors import SqonnxError
from sqonnx.graph.tensors import add_initializer, opset_version
from sqonnx.runtime.session import open_session

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
    # X^T X per run of each activation (float32 [C, C]), for GPTQ's weight rounding (sqonnx.math.gptq); when asked
    hessians: dict[str, np.ndarray] = field(default_factory=dict)

    def save(self, file: object) -> None:
        """To an .npz (a path or an open file)."""
        arrays = {f"max/{k}": v for k, v in self.channel_max.items()}
        arrays |= {f"rows/{k}": v for k, v in self.rows.items()}
        arrays |= {f"maps/{k}": v for k, v in self.maps.items()}
        arrays |= {f"hess/{k}": v for k, v in self.hessians.items()}
        np.savez(file, **arrays)  # type: ignore[arg-type]

    @classmethod
    def load(cls, path: Path) -> ActivationStats:
        stats = cls({})
        fields = {"max": stats.channel_max, "rows": stats.rows, "maps": stats.maps, "hess": stats.hessians}
        with np.load(path) as archive:
            for key in archive.files:
                kind, name = key.split("/", 1)
                fields[kind][name] = archive[key]
        return stats


Sample = dict[str, np.ndarray] | DecodeChain


class StatisticsSession:
    """One onnxruntime session over `model` with statistics outputs: the per-channel maxima of `activations`
    (name -> channels) and `keep_rows` rows of each, taken evenly from the first `row_samples` samples. Its
    other outputs are `outputs` (values the caller fetches: carried to the next block, a decode step's cache).

    onnxruntime runs every node of a session whatever a run fetches, so the session holds only what these
    outputs need: a block's LM head, for one, is not computed while calibrating (its input's maxima are).

    `gram`: also X^T X of each activation, summed over every token of every run (C x C numbers per run, computed
    by onnxruntime like the maxima: GPTQ's Hessians)."""

    def __init__(self, model: ir.Model, activations: dict[str, int], *, keep_rows: int = 0, row_samples: int = 1,
                 outputs: Sequence[str] = (), what: str = "the model", prepack: bool = True,
                 gram: bool = False, providers: list[str | tuple[str, dict[str, str]]] | None = None) -> None:
        clone = model.clone()
        graph = clone.graph
        # ReduceMax takes its axes as an input from opset 18 on, as an attribute before.
        axes_as_input = opset_version(graph) >= 18
        values = _values(graph)
        self.names = list(activations)
        maxima = [_channel_max(graph, values[name], channels, index, axes_as_input)
                  for index, (name, channels) in enumerate(activations.items())]
        self.max_outputs = [str(out.name) for out in maxima]
        grams = [_gram(graph, values[name], channels, index)
                 for index, (name, channels) in enumerate(activations.items())] if gram else []
        self.gram_outputs = [str(out.name) for out in grams]
        self.grams: dict[str, np.ndarray] = {}
        self.gram_runs: dict[str, int] = {}
        self.inputs = {str(v.name) for v in graph.inputs}
        self.row_outputs = [name for name in self.names if name not in self.inputs] if keep_rows else []
        wanted = [values[name] for name in dict.fromkeys([*outputs, *self.row_outputs])]
        graph.outputs.clear()
        graph.outputs.extend([*maxima, *grams, *wanted])
        common_passes.RemoveUnusedNodesPass()(clone)
        self.session = open_session(clone, float32=True, prepack=prepack, what=what, providers=providers)
        self.keep_rows = keep_rows
        self.row_samples = max(row_samples, 1)
        self.per_sample = -(-keep_rows // self.row_samples) if keep_rows else 0
        self.maxima: dict[str, np.ndarray] = {}
        self.rows: dict[str, list[np.ndarray]] = {name: [] for name in self.names} if keep_rows else {}

    def run(self, feeds: dict[str, np.ndarray], *, sample: int, rows: bool = True, fetch: Sequence[str] = (),
            where: str = "a calibration sample") -> dict[str, np.ndarray]:
        """One run, added to the statistics; rows are kept from it when `rows` and it is one of the first
        `row_samples` samples. Returns the `fetch` outputs."""
        keep = rows and self.per_sample > 0 and sample < self.row_samples
        row_fetch = self.row_outputs if keep else []
        names = [*self.max_outputs, *self.gram_outputs, *row_fetch, *fetch]
        results = iter(self.session.run(names, feeds, where))
        maxima = [next(results) for _ in self.max_outputs]
        for name, _ in zip(self.names, self.gram_outputs, strict=False):
            found = next(results)
            if name in self.grams:
                self.grams[name] += found
            else:
                self.grams[name] = found  # float32 sums: 485 MB for a Llama-2-7B down_proj input, not 970
            self.gram_runs[name] = self.gram_runs.get(name, 0) + 1
        fetched_rows = {name: next(results) for name in row_fetch}
        returned = {name: next(results) for name in fetch}
        _add_maxima(self.maxima, self.names, maxima, where)
        if keep:
            for name in self.names:
                activation = fetched_rows[name] if name in fetched_rows else feeds[name]
                flat = activation.reshape(-1, activation.shape[-1])
                picked = np.linspace(0, len(flat) - 1, min(self.per_sample, len(flat))).astype(np.int64)
                self.rows[name].append(np.clip(flat[picked], -FLOAT16_MAX, FLOAT16_MAX).astype(np.float16))
        return returned

    def passthrough(self, feeds: dict[str, np.ndarray], fetch: Sequence[str], where: str) -> dict[str, np.ndarray]:
        """One run that adds nothing to the statistics (a held-back sample on its way to the next block)."""
        return dict(zip(fetch, self.session.run(list(fetch), feeds, where), strict=True))

    def close(self) -> None:
        """Free the session (its pre-packed weights) before the next one opens."""
        self.session = None  # type: ignore[assignment]

    def statistics(self) -> ActivationStats:
        kept = {name: np.concatenate(parts)[:self.keep_rows] for name, parts in self.rows.items() if parts}
        # per run, not per token: GPTQ needs X^T X only up to a positive factor
        hessians = {name: (total / max(self.gram_runs.get(name, 1), 1)).astype(np.float32)
                    for name, total in self.grams.items()}
        return ActivationStats(dict(self.maxima), kept, hessians=hessians)


def read_probes(model: ir.Model, probes: Sequence[Probe], feeds: dict[str, np.ndarray],
                what: str = "the model") -> dict[str, np.ndarray]:
    """The channel map of each probe, read in one run of `feeds` (the first sample) through a session that holds
    only the probes' replays and what they read."""
    if not probes:
        return {}
    clone = model.clone()
    graph = clone.graph
    axes_as_input = opset_version(graph) >= 18
    values = _values(graph)
    added: dict[str, list[str]] = {}
    outputs: list[ir.Value] = []
    for index, probe in enumerate(probes):
        moved = _rebind(probe, values)
        _, found = add_probe(graph, moved, index, axes_as_input)
        outputs += found
        added[probe.name] = [str(v.name) for v in found]
    graph.outputs.clear()
    graph.outputs.extend(outputs)
    common_passes.RemoveUnusedNodesPass()(clone)
    session = open_session(clone, float32=True, prepack=False, what=what)  # one run
    names = [name for names in added.values() for name in names]
    results = dict(zip(names, session.run(names, feeds, "the first calibration sample"), strict=True))
    maps: dict[str, np.ndarray] = {}
    for probe in probes:
        found = read_map(probe, *[results[name] for name in added[probe.name]])
        if found is None:
            logger.info("no clean channel map for %s", probe.name)
        else:
            maps[probe.name] = found
    return maps


def _values(graph: ir.Graph) -> dict[str, ir.Value]:
    values = {str(v.name): v for node in graph for v in (*node.inputs, *node.outputs) if v is not None}
    values.update({str(v.name): v for v in graph.inputs})
    return values


def _rebind(probe: Probe, values: dict[str, ir.Value]) -> Probe:
    """The probe on the clone of its model: its values and nodes looked up by name."""
    def node_of(node: ir.Node) -> ir.Node:
        found = values[str(node.outputs[0].name)].producer()
        assert found is not None
        return found

    return Probe(probe.name, values[str(probe.start.name)], probe.columns,
                 tuple((node_of(node), live, out) for node, live, out in probe.moves),
                 values[str(probe.target.name)], probe.channels,
                 tuple((step, tuple((node_of(reader), index) for reader, index in readers))
                       for step, readers in probe.splits))


def _channel_max(graph: ir.Graph, value: ir.Value, channels: int, index: int, axes_as_input: bool) -> ir.Value:
    shape = add_initializer(graph, f"sqonnx_calib_shape_{index}", np.array([-1, channels], np.int64))
    absolute = ir.Node("", "Abs", [value], name=f"sqonnx_calib_abs_{index}")
    flat = ir.Node("", "Reshape", [absolute.outputs[0], shape], name=f"sqonnx_calib_reshape_{index}")
    attributes: dict[str, ir.Attr] = {"keepdims": ir.AttrInt64("keepdims", 0)}
    reduce_inputs = [flat.outputs[0]]
    if axes_as_input:
        reduce_inputs.append(add_initializer(graph, f"sqonnx_calib_axes_{index}", np.array([0], np.int64)))
    else:
        attributes["axes"] = ir.AttrInt64s("axes", [0])
    reduce = ir.Node("", "ReduceMax", reduce_inputs, attributes, name=f"sqonnx_calib_max_{index}")
    out = reduce.outputs[0]
    out.name = f"sqonnx_calib_max_{index}_output"
    out.dtype = ir.DataType.FLOAT
    out.shape = ir.Shape([channels])
    absolute.outputs[0].name = f"sqonnx_calib_abs_{index}_output"
    flat.outputs[0].name = f"sqonnx_calib_reshape_{index}_output"
    graph.extend([absolute, flat, reduce])
    return out


def _gram(graph: ir.Graph, value: ir.Value, channels: int, index: int) -> ir.Value:
    """X^T X over the rows of `value` ([..., C] -> [C, C]), in float32."""
    shape = add_initializer(graph, f"sqonnx_gram_shape_{index}", np.array([-1, channels], np.int64))
    flat = ir.Node("", "Reshape", [value, shape], name=f"sqonnx_gram_reshape_{index}")
    transposed = ir.Node("", "Transpose", [flat.outputs[0]], {"perm": ir.AttrInt64s("perm", [1, 0])},
                         name=f"sqonnx_gram_transpose_{index}")
    product = ir.Node("", "MatMul", [transposed.outputs[0], flat.outputs[0]], name=f"sqonnx_gram_{index}")
    for node, suffix in ((flat, "reshape"), (transposed, "transpose")):
        node.outputs[0].name = f"sqonnx_gram_{suffix}_{index}_output"
    out = product.outputs[0]
    out.name = f"sqonnx_gram_{index}_output"
    out.dtype = ir.DataType.FLOAT
    out.shape = ir.Shape([channels, channels])
    graph.extend([flat, transposed, product])
    return out


def _add_maxima(maxima: dict[str, np.ndarray], names: list[str], results: list[np.ndarray], where: str) -> None:
    for name, result in zip(names, results, strict=True):
        if not np.all(np.isfinite(result)):
            raise SqonnxError(f"activation '{name}' is NaN or infinite on {where}; check the calibration data")
        previous = maxima.get(name)
        maxima[name] = result if previous is None else np.maximum(previous, result)
