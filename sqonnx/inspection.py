"""`sqonnx inspect`: where a model's outliers are, and what smoothing does to them, without writing a model.

Per smoothing group (the layers that read one activation): the max/median ratio of per-channel max|X|
and of per-input-channel max|W| before and after smoothing, the α used (searched per group by default),
and each layer's sensitivity: the relative error of its output when it alone is quantized (INT8 at the
chosen level, after smoothing), measured on calibration rows. For the worst groups, PNG plots of the
per-channel magnitudes before and after, as the SmoothQuant paper's figures show them; an HTML page ties
them together, and report.json has every number.
"""

from __future__ import annotations

import html
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from sqonnx.calibrators import calibration_feeds, collect_statistics
from sqonnx.config import QuantizeConfig
from sqonnx.errors import SqonnxError
from sqonnx.graph import load_model
from sqonnx.passes.smoothing_groups import SmoothingGroup, find_smoothing_groups
from sqonnx.search import AlphaSearch, group_error
from sqonnx.smoothing import input_channel_max, smoothing_scales

KEPT_ROWS = 512


@dataclass
class GroupInspection:
    activation: str
    layers: list[str]
    absorber: str  # what would absorb 1/s, or why nothing can
    alpha: float | None
    activation_ratio_before: float  # max / median of per-channel max|X|
    activation_ratio_after: float
    weight_ratio_before: float  # max / median of per-input-channel max|W| over the group
    weight_ratio_after: float
    sensitivity: dict[str, float]  # layer -> relative output error when only it is quantized (smoothed)
    sensitivity_unsmoothed: dict[str, float]
    plot: str = ""


def ratio(values: np.ndarray) -> float:
    median = float(np.median(values))
    return float(values.max()) / median if median > 0 else float("inf")


def inspect_model(model_path: Path, out_dir: Path, config: QuantizeConfig, top: int = 8,
                  progress: bool = False) -> list[GroupInspection]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SqonnxError("the inspect report draws PNG plots with matplotlib; pip install 'sqonnx[report]'") from None
    model = load_model(model_path)
    if out_dir.exists() and not out_dir.is_dir():
        raise SqonnxError(f"--out {out_dir} is a file; give a folder for the report")
    groups = [g for g in find_smoothing_groups(model.graph)
              if not any(config.is_excluded(layer.name) for layer in g.layers)]
    if not groups:
        raise SqonnxError(f"{model_path.name} has no MatMul/Gemm with a constant float weight to inspect")
    feeds = calibration_feeds(model.graph, model_path.parent, config.calibration)
    wanted = {str(g.activation.name): g.channels for g in groups}
    stats = collect_statistics(model, wanted, feeds, feeds.count, progress=progress, keep_rows=KEPT_ROWS)
    search = AlphaSearch(stats.rows, config.alpha_grid, config.level, config.weight_qmax, config.per_channel,
                         config.calib_method)
    results = [_inspect_group(g, stats.channel_max[str(g.activation.name)], stats.rows[str(g.activation.name)],
                              config, search) for g in groups]
    out_dir.mkdir(parents=True, exist_ok=True)
    worst = sorted(range(len(results)), key=lambda i: -results[i].activation_ratio_before)[:top]
    for rank, index in enumerate(worst):
        results[index].plot = f"group_{rank:02d}.png"
        _plot(plt, groups[index], stats.channel_max[str(groups[index].activation.name)], results[index],
              out_dir / results[index].plot)
    (out_dir / "report.json").write_text(json.dumps([asdict(r) for r in results], indent=2))
    (out_dir / "index.html").write_text(_html(model_path, results, [results[i] for i in worst], config))
    return results


def _scales(group: SmoothingGroup, act_max: np.ndarray, alpha: float | None) -> np.ndarray:
    weight_max = np.max([input_channel_max(layer.weight, layer.in_axis) for layer in group.layers], axis=0)
    if alpha is None:
        return np.ones_like(act_max)
    return smoothing_scales(act_max, weight_max, alpha)


def _inspect_group(group: SmoothingGroup, act_max: np.ndarray, rows: np.ndarray, config: QuantizeConfig,
                   search: AlphaSearch) -> GroupInspection:
    weights = [(layer.weight, layer.in_axis) for layer in group.layers]
    alpha: float | None = (search.choose(str(group.activation.name), act_max, weights) if config.alpha_auto
                           else float(config.alpha))
    scales = _scales(group, act_max, alpha)
    weight_max = np.max([input_channel_max(w, axis) for w, axis in weights], axis=0)
    rows32 = rows.astype(np.float32)
    absorber = group.absorber
    if absorber is None:
        where = f"nothing can absorb 1/s: {group.reason}"
    else:
        where = f"{absorber.node.name} ({absorber.describe()})"
    return GroupInspection(
        activation=str(group.activation.name), layers=[layer.name for layer in group.layers], absorber=where,
        alpha=alpha, activation_ratio_before=ratio(act_max), activation_ratio_after=ratio(act_max / scales),
        weight_ratio_before=ratio(weight_max), weight_ratio_after=ratio(weight_max * scales),
        sensitivity={layer.name: group_error(rows32, act_max, [w], alpha, search)
                     for layer, w in zip(group.layers, weights, strict=True)},
        sensitivity_unsmoothed={layer.name: group_error(rows32, act_max, [w], None, search)
                                for layer, w in zip(group.layers, weights, strict=True)})


def _plot(plt, group: SmoothingGroup, act_max: np.ndarray, result: GroupInspection, path: Path) -> None:  # noqa: ANN001
    scales = _scales(group, act_max, result.alpha)
    weight_max = np.max([input_channel_max(layer.weight, layer.in_axis) for layer in group.layers], axis=0)
    channels = np.arange(len(act_max))
    figure, axes = plt.subplots(2, 2, figsize=(11, 5.5), sharex=True)
    alpha_text = "no smoothing" if result.alpha is None else f"α = {result.alpha}"
    panels = ((axes[0, 0], act_max, "activation max|X_j| before"),
              (axes[0, 1], act_max / scales, f"activation after ({alpha_text})"),
              (axes[1, 0], weight_max, "weight max|W_j| before"), (axes[1, 1], weight_max * scales, "weight after"))
    for axis, values, title in panels:
        axis.bar(channels, values, width=1.0, color="#c0392b" if title.startswith("activation") else "#2471a3")
        axis.set_title(f"{title}  (max/median {ratio(values):.1f})", fontsize=9)
        axis.set_xlabel("input channel j", fontsize=8)
    figure.suptitle(", ".join(result.layers), fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def _html(model_path: Path, results: list[GroupInspection], worst: list[GroupInspection],
          config: QuantizeConfig) -> str:
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
<p>Level {config.level.value}, α {alpha}, weights [-{config.weight_qmax}, {config.weight_qmax}]
{'per channel' if config.per_channel else 'per tensor'}. Outlier ratio: max / median of the per-channel maxima.
Sensitivity: relative squared error of the layer's output when only that layer is quantized, on calibration rows
(first half fits the static range, second half scores it).</p>
<h2>Worst layers by activation outliers</h2>{figures}
<h2>All layers</h2><table><tr><th>layer</th><th>1/s absorbed by</th><th>α</th><th>act. ratio before</th>
<th>after</th><th>weight ratio before</th><th>after</th><th>sensitivity unsmoothed</th><th>smoothed</th></tr>
{''.join(rows)}</table></body></html>
"""
