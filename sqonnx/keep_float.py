"""`--keep-float-budget`: leave the fewest, most sensitive layers in float until the quality loss fits.

Per-tensor static INT8 everywhere can miss a quality target that a handful of float layers would meet.
Layers are ranked by sensitivity: the squared error of a layer's output when it alone is quantized (after
smoothing, on calibration rows), in the output's own units, since in a residual network a layer's error
adds to the residual stream at the size of its output (a relative error would rank a small-output layer
as high as a large one); then 0, 1, 2, 4, 8... of the most sensitive stay in float until the
model's quality loss on a few calibration samples is within the budget. Quality loss: perplexity / FP32
perplexity - 1 for a language model (a `logits` output and `input_ids`), else 1 - mean cosine of the
first output to FP32. Each choice is kept in the report with its loss and its speed relative to FP32,
which is the trade-off the user picks from.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from sqonnx.calibrators import ActivationStats
from sqonnx.config import QuantizeConfig
from sqonnx.passes.smoothing_groups import find_smoothing_groups
from sqonnx.report import LayerReport
from sqonnx.search import AlphaSearch, group_error

logger = logging.getLogger(__name__)

EVAL_SAMPLES = 4


@dataclass
class KeepFloatTrial:
    float_layers: list[str]
    quality_loss: float
    speedup: float  # FP32 time / this model's time, one forward of the first evaluation sample


def rank_by_sensitivity(model: ir.Model, layer_reports: list[LayerReport], stats: ActivationStats,
                        config: QuantizeConfig) -> list[str]:
    """Quantized layers, most sensitive first. `model` is a fresh (unsmoothed) copy."""
    alphas = {r.name: r.alpha for r in layer_reports if r.quantized}
    search = AlphaSearch(stats.rows, (), config.level, config.weight_qmax, config.per_channel, config.calib_method)
    scores: dict[str, float] = {}
    for group in find_smoothing_groups(model.graph):
        name = str(group.activation.name)
        rows, act_max = stats.rows.get(name), stats.channel_max.get(name)
        for layer in group.layers:
            if layer.name not in alphas or rows is None or act_max is None:
                continue
            scores[layer.name] = group_error(rows.astype(np.float32), act_max, [(layer.weight, layer.in_axis)],
                                             alphas[layer.name], search, relative=False)
    return sorted(scores, key=lambda n: -scores[n])


def choose_float_layers(build: Callable[[frozenset[str]], Any], fp32: Path, feeds: Iterable[dict[str, np.ndarray]],
                        ranking: list[str], budget: float,
                        workdir: Path) -> tuple[frozenset[str], list[KeepFloatTrial]]:
    samples = list(itertools.islice(iter(feeds), EVAL_SAMPLES))
    reference, fp32_seconds = _run(fp32, samples)
    trials: list[KeepFloatTrial] = []
    count = 0
    while True:
        chosen = frozenset(ranking[:count])
        built = build(chosen)
        trial = workdir / "keep-float-trial.onnx"
        ir.save(built.model, trial, external_data="keep-float-trial.onnx.data")
        outputs, seconds = _run(trial, samples)
        loss = quality_loss(reference, outputs, samples)
        trials.append(KeepFloatTrial(list(ranking[:count]), loss, fp32_seconds / seconds))
        logger.info("keep-float: %d layers in float -> quality loss %.4f", count, loss)
        if loss <= budget or count >= len(ranking) // 2:
            break
        count = 1 if count == 0 else 2 * count
    if trials[-1].quality_loss > budget:
        logger.warning("--keep-float-budget %.3g not met with %d of %d layers in float (loss %.4f); "
                       "keeping those", budget, count, len(ranking), trials[-1].quality_loss)
    return chosen, trials


def least_loss(candidates: dict[str, Callable[[], Any]], fp32: Path, feeds: Iterable[dict[str, np.ndarray]],
               workdir: Path) -> tuple[str, dict[str, float]]:
    """The candidate build whose first output is nearest FP32 (relative L2 error) on `feeds` (samples the
    statistics have not seen), and every candidate's error. Used by --alpha auto, which keeps its per-group choice
    only where it beats every single α tried at the level of the whole model (a sum of per-group optima
    can lose to one α). The output error, unlike a perplexity, needs no meaningful next-token labels."""
    samples = list(feeds)
    reference, _ = _run(fp32, samples)
    losses: dict[str, float] = {}
    for key, build in candidates.items():
        trial = workdir / "alpha-trial.onnx"
        ir.save(build().model, trial, external_data="alpha-trial.onnx.data")
        outputs, _ = _run(trial, samples)
        losses[key] = output_error(reference, outputs)
        logger.info("alpha %s -> output error %.4f", key, losses[key])
    return min(losses, key=lambda k: losses[k]), losses


def _run(path: Path, samples: list[dict[str, np.ndarray]]) -> tuple[list[dict[str, np.ndarray]], float]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    outputs = [dict(zip(names, session.run(None, feed), strict=True)) for feed in samples]
    start = time.perf_counter()
    session.run(None, samples[0])
    return outputs, time.perf_counter() - start


def output_error(reference: list[dict[str, np.ndarray]], outputs: list[dict[str, np.ndarray]]) -> float:
    first = next(iter(reference[0]))
    num = sum(float(np.sum((out[first].astype(np.float64) - ref[first]) ** 2)) for ref, out in zip(
        reference, outputs, strict=True))
    den = sum(float(np.sum(ref[first].astype(np.float64) ** 2)) for ref in reference)
    return float(np.sqrt(num / max(den, 1e-30)))


def quality_loss(reference: list[dict[str, np.ndarray]], outputs: list[dict[str, np.ndarray]],
                 samples: list[dict[str, np.ndarray]]) -> float:
    if "logits" in reference[0] and "input_ids" in samples[0]:
        return _perplexity(outputs, samples) / _perplexity(reference, samples) - 1.0
    first = next(iter(reference[0]))
    cosines = []
    for ref, out in zip(reference, outputs, strict=True):
        a, b = ref[first].ravel().astype(np.float64), out[first].ravel().astype(np.float64)
        cosines.append(float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30)))
    return 1.0 - float(np.mean(cosines))


def _perplexity(outputs: list[dict[str, np.ndarray]], samples: list[dict[str, np.ndarray]]) -> float:
    total, count = 0.0, 0
    for out, feed in zip(outputs, samples, strict=True):
        logits = out["logits"][0, :-1].astype(np.float64)
        tokens = feed["input_ids"][0, 1:]
        top = logits.max(axis=-1, keepdims=True)
        log_z = np.log(np.exp(logits - top).sum(axis=-1)) + top[:, 0]
        total += float((log_z - logits[np.arange(len(tokens)), tokens]).sum())
        count += len(tokens)
    return float(np.exp(total / count))
