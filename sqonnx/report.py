"""What a quantization run did, per layer: the report `sqonnx.quantize` returns and the CLI prints."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from sqonnx.judgements.layer_report import LayerReport
from sqonnx.judgements.quality import QualityCheck
from sqonnx.runtime.kernels import KernelCheck


@dataclass
class QuantizeReport:
    input_path: str
    output_path: str
    settings: dict[str, Any]
    calibration: str
    layers: list[LayerReport] = field(default_factory=list)
    kernels: KernelCheck | None = None
    input_bytes: int = 0
    output_bytes: int = 0
    seconds: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)  # seconds per phase (load, calibrate, ...)
    peak_rss_bytes: int = 0
    check: QualityCheck | None = None  # the written model against FP32 on held-back samples (sqonnx.judgements.quality)

    @property
    def quantized_layers(self) -> list[LayerReport]:
        return [layer for layer in self.layers if layer.quantized]

    @property
    def smoothed_layers(self) -> list[LayerReport]:
        return [layer for layer in self.layers if layer.scale_min is not None]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        quantized = self.quantized_layers
        smoothed = self.smoothed_layers
        kinds: dict[str, int] = {}
        for layer in smoothed:
            kinds[layer.smoothing] = kinds.get(layer.smoothing, 0) + 1
        ratio_before = max((layer.outlier_ratio_before for layer in quantized), default=0.0)
        ratio_after = max((layer.outlier_ratio_after for layer in quantized), default=0.0)
        lines = [
            f"{self.input_path} -> {self.output_path}",
            f"  calibration: {self.calibration}",
            f"  level {self.settings.get('level')} ({self.settings.get('activations')}), "
            f"{self.settings.get('format')} form, target {self.settings.get('target')}",
            f"  weights: {self.settings.get('weights')}, rounded {self.settings.get('weight_rounding')}; "
            f"int16 worst case {self.settings.get('int16_worst_case')}",
            *([f"  --optimize fused: {self.settings['optimize']}"] if "optimize" in self.settings else []),
            *([f"  {self.settings['rotation']}"] if "rotation" in self.settings else []),
            *[f"  keep-float trial: {len(t['float_layers'])} layers in float -> quality loss {t['quality_loss']:.4f}"
              + (" (written), " if t.get("chosen") else ", ")
              + (f"{t['speedup']:.2f}x FP32 speed" if t["speedup"] == t["speedup"] and t["speedup"] > 0
                 else "speed not measured (calibration resumed from --cache-dir)")
              for t in self.settings.get("keep_float", [])],
            f"  quantized {len(quantized)} of {len(self.layers)} linear layers; smoothed {len(smoothed)}"
            + (f" ({', '.join(f'{n} via {k}' for k, n in sorted(kinds.items()))})" if kinds else ""),
            f"  worst outlier ratio (channel max / median) before -> after smoothing: "
            f"{ratio_before:.1f} -> {ratio_after:.1f}",
            *([f"  {self.settings['quality_check']}"] if "quality_check" in self.settings else []),
            *([f"  LM head {self.settings['lm_head']}"] if "lm_head" in self.settings else []),
            *([f"  {self.settings['decode']}"] if "decode" in self.settings else []),
            *([f"  TensorRT: {self.settings['tensorrt']}"] if "tensorrt" in self.settings else []),
            *([f"  CUDA: {self.settings['cuda']}"] if "cuda" in self.settings else []),
            f"  size: {self.input_bytes / 1e6:.1f} MB -> {self.output_bytes / 1e6:.1f} MB in {self.seconds:.1f} s",
            *([f"  {self.settings['blocks']}"] if "blocks" in self.settings else []),
            *([f"  --cache-dir {self.settings['cache']}"] if "cache" in self.settings else []),
            f"  peak memory {self.peak_rss_bytes / 1e9:.2f} GB; "
            + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in self.phases.items()),
        ]
        if self.kernels is not None:
            lines.append(f"  onnxruntime CPU: {self.kernels.summary()}")
        return "\n".join(lines)
