"""`sqonnx.quantize`: a run, as the reader follows it: load -> plan (prepare, calibrate, smooth, quantize, judge; block
by block, every candidate staged) -> save -> report.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import onnx_ir as ir

from sqonnx.config import QuantizeConfig
from sqonnx.io.genai import companion_files
from sqonnx.io.load import load_model
from sqonnx.io.writer import StreamingWriter, check_output_path
from sqonnx.report import QuantizeReport
from sqonnx.run.front import check_quantizable
from sqonnx.run.plan import enforce, plan_run
from sqonnx.run.progress import Progress, peak_rss_bytes

logger = logging.getLogger(__name__)


def quantize(model_path: str | Path, output_path: str | Path | None = None,
             config: QuantizeConfig | None = None, *, progress: bool = False) -> QuantizeReport:
    """Quantize `model_path` to W8A8 SmoothQuant and save it at `output_path` (default `<stem>.int8.onnx`).
    `progress`: a line per block (and a bar on a terminal) on stderr."""
    return _quantize(Path(model_path), output_path, config or QuantizeConfig(), Progress(progress))


def _quantize(model_path: Path, output_path: str | Path | None, config: QuantizeConfig,
              progress: Progress) -> QuantizeReport:
    started = time.perf_counter()
    output_path = Path(output_path) if output_path is not None else model_path.with_suffix(".int8.onnx")
    check_output_path(model_path, output_path)
    with progress.phase("load"):
        model = load_model(model_path)
        companions = companion_files(model_path, output_path)  # an onnxruntime-genai folder's config and tokenizer
        check_quantizable(model, config)
        input_bytes = _model_bytes(model_path, model)
        external = any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values())
    with StreamingWriter(output_path, external, companions) as writer:
        plan = plan_run(model, model_path, config, writer, progress)
        del model
        enforce(plan)
        settings = plan.settings()
        with progress.phase("save"):
            written = writer.finish(plan.stage, plan.front.model, plan.metadata())
    result = plan.outcome.result
    report = QuantizeReport(
        input_path=str(model_path), output_path=str(output_path), settings=settings,
        calibration=plan.front.feeds.description, layers=result.layer_reports, kernels=result.kernels,
        input_bytes=input_bytes, output_bytes=written, seconds=time.perf_counter() - started,
        phases=dict(progress.phases), peak_rss_bytes=peak_rss_bytes(), check=plan.outcome.check)
    if report.kernels is not None and report.kernels.unfused:
        logger.warning("onnxruntime left %d quantized layers unfused (float MatMul after DequantizeLinear): %s",
                       len(report.kernels.unfused), ", ".join(report.kernels.unfused[:5]))
    return report


def _model_bytes(path: Path, model: ir.Model) -> int:
    """The .onnx file plus every external data file its initializers point to."""
    data_files = {Path(v.const_value.path) for v in model.graph.initializers.values()
                  if isinstance(v.const_value, ir.ExternalTensor)}
    return path.stat().st_size + sum(f.stat().st_size for f in data_files if f.exists())
