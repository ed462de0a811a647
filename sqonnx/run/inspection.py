"""`sqonnx inspect`: where a model's outliers are, and what smoothing does to them, without writing a model.

It goes through `quantize`'s own front end (sqonnx.run.front) and smoothing (`run.build.smooth_block`): the residual
stream is rotated where quantize first rotates it, the model is calibrated block by block on the samples quantize
counts (the check's held-back ones aside), and every group's α, s, or reason to stay unsmoothed is the one quantize
chooses. Two judgements need whole-model evidence inspect does not gather: `--alpha auto` may end on a single α
(its per-group choices are shown), and the default may decline the rotation after judging it (the rotated graph
is shown; `--no-rotate` shows the other).

Per smoothing group (the layers that read one activation): the max/median ratio of per-channel max|X| and of
per-input-channel max|W| before and after smoothing, the α used, and each layer's sensitivity: the relative error of its
output when it alone is quantized (INT8 at the chosen level, after smoothing), measured on calibration rows. For the
worst groups, PNG plots of the per-channel magnitudes before and after, as the SmoothQuant paper's figures show
them; an HTML page ties them together, and report.json has every number.
"""

from __future__ import annotations

import html
import json
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from sqonnx.config import QuantizeConfig
from sqonnx.errors import SqonnxError
from sqonnx.io.load import load_model
from sqonnx.math.search import AlphaSearch, group_error
from sqonnx.math.smoothing import as_float32, group_weight_max, outlier_ratio
from sqonnx.passes.smooth import GroupResult
from sqonnx.passes.smoothing_groups import find_smoothing_groups
from sqonnx.run.build import quantization_scheme, smooth_block
from sqonnx.run.front import prepare_model
from sqonnx.run.pipeline import Pipeline
from sqonnx.run.progress import Progress


@dataclass
class GroupInspection:
    activation: str
    layers: list[str]
    absorber: str  # what absorbed 1/s (and how), or why the group is not smoothed
    alpha: float | None
    scale_min: float | None  # the range of s (None: not smoothed)
    scale_max: float | None
    activation_ratio_before: float  # max / median of per-channel max|X|
    activation_ratio_after: float
    weight_ratio_before: float  # max / median of per-input-channel max|W| over the group
    weight_ratio_after: float
    sensitivity: dict[str, float]  # layer -> relative output error when only it is quantized (smoothed)
    sensitivity_unsmoothed: dict[str, float]
    # The TOP_CHANNELS largest activation channels before smoothing: channel, activation before/after, weight
    # before/after (the numbers the plot annotates).
    top_channels: list[dict[str, float]] = field(default_factory=list)
    plot: str = ""


def inspect_model(model_path: Path, out_dir: Path, config: QuantizeConfig, top: int = 8,
                  progress: bool = False) -> list[GroupInspection]:
    """Calibrate the model as `quantize` would see it (the same front end: rotated where quantize rotates, cut
    into the same blocks, one block in memory at a time) and report every smoothing group."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SqonnxError("the inspect report draws PNG plots with matplotlib; pip install 'sqonnx[report]'") from None
    if out_dir.exists() and not out_dir.is_dir():
        raise SqonnxError(f"--out {out_dir} is a file; give a folder for the report")
    model = load_model(model_path)
    results: list[GroupInspection] = []
    panels: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # act_max, s, weight max per group, for plots
    with tempfile.TemporaryDirectory(prefix="sqonnx-inspect-") as workdir:
        front = prepare_model(model, model_path, config, Path(workdir), Progress(progress))
        pipeline = Pipeline(front, Path(workdir), Progress(progress))
        for block, stats in pipeline.calibrated_blocks(config):
            search = quantization_scheme(config, stats)
            originals = {layer.name: (layer.weight, layer.in_axis) for group in find_smoothing_groups(block.graph)
                         for layer in group.layers}
            for group in smooth_block(block, config, stats, front.quantized, search):
                name = str(group.group.activation.name)
                if not any(layer.name in front.quantized for layer in group.group.layers) or name not in stats.rows:
                    continue
                weights = [originals[layer.name] for layer in group.group.layers]
                act_max = stats.channel_max[name]
                results.append(_inspect_group(group, act_max, stats.rows[name], weights, search))
                scales = group.scales if group.scales is not None else np.ones_like(act_max)
                panels.append((act_max, scales, group_weight_max(weights)))
    if not results:
        raise SqonnxError(f"{model_path.name} has no MatMul/Gemm with a constant float weight to inspect")
    out_dir.mkdir(parents=True, exist_ok=True)
    worst = sorted(range(len(results)), key=lambda i: -results[i].activation_ratio_before)[:top]
    for rank, index in enumerate(worst):
        results[index].plot = f"group_{rank:02d}.png"
        figure = draw_group(plt, *panels[index], results[index])
        figure.savefig(out_dir / results[index].plot, dpi=90)
        plt.close(figure)
    (out_dir / "report.json").write_text(json.dumps([asdict(r) for r in results], indent=2))
    # UTF-8 as the page declares (it has α and →), whatever the locale
    (out_dir / "index.html").write_text(_html(model_path, results, [results[i] for i in worst], config,
                                              front.rotation.summary()), encoding="utf-8")
    return results


def _inspect_group(result: GroupResult, act_max: np.ndarray, rows: np.ndarray, weights: list[tuple[np.ndarray, int]],
                   search: AlphaSearch) -> GroupInspection:
    """One group as quantize smoothed it; `weights`: its layers' weights before smoothing."""
    group, alpha = result.group, result.alpha
    scales = result.scales if result.scales is not None else np.ones_like(act_max)
    weight_max = group_weight_max(weights)
    rows32 = as_float32(rows)
    where = f"{result.folded_into} ({result.method})" if result.scales is not None else result.method
    after, weight_after = act_max / scales, weight_max * scales
    top = [{"channel": j, "activation_before": float(act_max[j]), "activation_after": float(after[j]),
            "weight_before": float(weight_max[j]), "weight_after": float(weight_after[j])}
           for j in top_channels(act_max, TOP_CHANNELS)]
    return GroupInspection(
        top_channels=top,
        activation=str(group.activation.name), layers=[layer.name for layer in group.layers], absorber=where,
        alpha=alpha, scale_min=None if result.scales is None else float(scales.min()),
        scale_max=None if result.scales is None else float(scales.max()),
        activation_ratio_before=outlier_ratio(act_max), activation_ratio_after=outlier_ratio(after),
        weight_ratio_before=outlier_ratio(weight_max), weight_ratio_after=outlier_ratio(weight_after),
        sensitivity={layer.name: group_error(rows32, act_max, [w], alpha, search)
                     for layer, w in zip(group.layers, weights, strict=True)},
        sensitivity_unsmoothed={layer.name: group_error(rows32, act_max, [w], None, search)
                                for layer, w in zip(group.layers, weights, strict=True)})


TOP_CHANNELS = 5  # channels listed per group in report.json; the first 3 are annotated in the plots
ANNOTATED = 3


def top_channels(values: np.ndarray, count: int) -> list[int]:
    """Indices of the `count` largest values, largest first (the lower index first on ties)."""
    order = np.lexsort((np.arange(len(values)), -np.asarray(values, dtype=np.float64)))
    return [int(i) for i in order[:count]]


def draw_group(plt, act_max: np.ndarray, scales: np.ndarray, weight_max: np.ndarray,  # noqa: ANN001
               result: GroupInspection):  # -> matplotlib Figure
    """Four panels stacked on one channel axis (activation before/after, weight before/after), so a channel
    sits at the same x in all four.

    Each channel is a vertical line at least a pixel wide: with 1536 channels in ~900 pixels, bars of width 1
    came out thinner than a pixel and the renderer dropped some, the largest (SmolLM2's down_proj channel with
    max|x| ~3000) among them. The panel's top channels get a marker and "#index value"; dotted lines mark
    the activation's top channels through every panel, so one can follow them from before to after.
    """
    channels = np.arange(len(act_max))
    figure, axes = plt.subplots(4, 1, figsize=(12, 9), sharex=True)
    alpha_text = "no smoothing" if result.alpha is None else f"α = {result.alpha}"
    panels = ((act_max, "activation max|X_j| before", "#c0392b"),
              (act_max / scales, f"activation max|X_j / s_j| after ({alpha_text})", "#c0392b"),
              (weight_max, "weight max|W_j| before", "#2471a3"),
              (weight_max * scales, "weight max|s_j W_j| after", "#2471a3"))
    guides = top_channels(act_max, ANNOTATED)
    for axis, (values, title, color) in zip(axes, panels, strict=True):
        axis.vlines(channels, 0, values, colors=color, linewidth=0.9)
        for channel in guides:
            axis.axvline(channel, color="#7f8c8d", linestyle=":", linewidth=0.8, zorder=0)
        top = top_channels(values, ANNOTATED)
        axis.plot(top, values[top], "o", color="black", markersize=3)
        peak = float(values.max())
        for channel in top:  # beside the point: below the top of a tall line, above a short one
            tall = values[channel] > 0.5 * peak
            axis.annotate(f"#{channel}  {values[channel]:.4g}", (channel, values[channel]), fontsize=7,
                          xytext=(4, -2 if tall else 2), textcoords="offset points", va="top" if tall else "bottom")
        axis.set_ylim(0, peak * 1.15 or 1.0)
        axis.set_xlim(-0.5, len(values) - 0.5)
        axis.set_title(f"{title}  (max/median {outlier_ratio(values):.1f})", fontsize=9, loc="left")
    axes[-1].set_xlabel("input channel j", fontsize=8)
    figure.suptitle(", ".join(result.layers), fontsize=9)
    figure.tight_layout()
    return figure


def _html(model_path: Path, results: list[GroupInspection], worst: list[GroupInspection],
          config: QuantizeConfig, rotation: str) -> str:
    def cell(value: float | None) -> str:
        return "" if value is None else f"{value:.3g}"

    rows = []
    for r in results:
        for layer in r.layers:
            rows.append(
                f"<tr><td>{html.escape(layer)}</td><td>{html.escape(r.absorber)}</td><td>{cell(r.alpha)}</td>"
                f"<td>{r.activation_ratio_before:.1f}</td><td>{r.activation_ratio_after:.1f}</td>"
                f"<td>{r.weight_ratio_before:.1f}</td><td>{r.weight_ratio_after:.1f}</td>"
                f"<td>{r.sensitivity_unsmoothed[layer]:.2e}</td><td>{r.sensitivity[layer]:.2e}</td></tr>")
    figures = "".join(f'<figure><img src="{r.plot}" alt="{html.escape(r.activation)}"><figcaption>'
                      f"{html.escape(', '.join(r.layers))}: activation outlier ratio {r.activation_ratio_before:.1f}"
                      f" → {r.activation_ratio_after:.1f}</figcaption></figure>" for r in worst)
    alpha = "searched per group" if config.alpha_auto else str(config.alpha)
    title = f"sqonnx inspect: {html.escape(model_path.name)}"
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse;font-size:12px}}
td,th{{border:1px solid #ccc;padding:2px 6px;text-align:right}}td:first-child,td:nth-child(2){{text-align:left}}
img{{max-width:100%}}</style></head><body>
<h1>{html.escape(str(model_path))}</h1>
<p>{html.escape(rotation)}.</p>
<p>Level {config.level.value}, α {alpha}, weights [-{config.weight_qmax}, {config.weight_qmax}]
{'per channel' if config.per_channel else 'per tensor'}. Outlier ratio: max / median of the per-channel maxima.
Sensitivity: relative squared error of the layer's output when only that layer is quantized, on calibration rows
(first half fits the static range, second half scores it).</p>
<h2>Worst layers by activation outliers</h2>{figures}
<h2>All layers</h2><table><tr><th>layer</th><th>1/s absorbed by</th><th>α</th><th>act. ratio before</th>
<th>after</th><th>weight ratio before</th><th>after</th><th>sensitivity unsmoothed</th><th>smoothed</th></tr>
{''.join(rows)}</table></body></html>
"""
