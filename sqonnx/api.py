"""`sqonnx.quantize`: a run, as the reader follows it: load -> plan (prepare, calibrate, smooth, quantize, judge; block
by block, every candidate staged) -> save -> report.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from sqonnx.config import QuantizeConfig
from sqonnx.io.writer import StreamingWriter, check_output_path
from sqonnx.report import QuantizeReport
from sqonnx.run.front import read_input
from sqonnx.run.plan import enforce, plan_run
from sqonnx.run.progress import Progress, peak_rss_bytes
from sqonnx.targets import rules_of

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
        loaded = read_input(model_path, output_path, config)
    with StreamingWriter(output_path, loaded.external, loaded.companions) as writer:
        plan = plan_run(loaded, model_path, config, writer, progress)
        enforce(plan)
        settings = plan.settings()
        with progress.phase("save"):
            written = writer.finish(plan.stage, plan.front.model, plan.metadata(settings))
    result = plan.outcome.result
    report = QuantizeReport(
        input_path=str(model_path), output_path=str(output_path), settings=settings,
        calibration=plan.front.feeds.description, layers=result.layer_reports, kernels=result.kernels,
        input_bytes=loaded.input_bytes, output_bytes=written, seconds=time.perf_counter() - started,
        phases=dict(progress.phases), peak_rss_bytes=peak_rss_bytes(), check=plan.outcome.check)
    # (a GPU target's half-precision Q/DQ is the GPU's to fuse: onnxruntime's CPU leaves it unfused)
    if report.kernels is not None and report.kernels.unfused and rules_of(config.target).on_cpu:
        logger.warning("onnxruntime left %d quantized layers unfused (float MatMul after DequantizeLinear): %s",
                       len(report.kernels.unfused), ", ".join(report.kernels.unfused[:5]))
    return report
