"""`sqonnx.quantize`: a run, as the reader follows it: load -> plan (prepare, calibrate, smooth, quantize, judge; block
by block, every candidate staged) -> save -> report.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import onnx

from sqonnx.calibrators.readers import SampleReader, is_sample_source, save_samples
from sqonnx.config import QuantizeConfig
from sqonnx.errors import SqonnxError
from sqonnx.io.load import save_model_proto
from sqonnx.io.writer import StreamingWriter, check_output_path
from sqonnx.report import QuantizeReport
from sqonnx.run.compare import CompareReport, compare_models
from sqonnx.run.front import read_input
from sqonnx.run.plan import enforce, plan_run
from sqonnx.run.progress import Progress, peak_rss_bytes
from sqonnx.targets import rules_of

logger = logging.getLogger(__name__)

# What `quantize` takes as calibration: a path or several, an onnxruntime CalibrationDataReader, feed dicts.
Calibration = str | Path | Sequence[str | Path] | SampleReader | Iterable[Mapping[str, Any]] | None


def quantize(model: str | Path | onnx.ModelProto, output_path: str | Path | None = None,
             config: QuantizeConfig | None = None, *, calibration: Calibration = None,
             progress: bool = False) -> QuantizeReport:
    """Quantize `model` (a path, or an `onnx.ModelProto` with its weights in it) to W8A8 SmoothQuant and save it at
    `output_path` (default `<stem>.int8.onnx`; required for a ModelProto).
    `calibration`: the calibration data, as `config.calibration.data` takes it (a text file, an .npz, several files
    or a folder), or as onnxruntime users hold it: a `CalibrationDataReader` or an iterable of feed dicts (read once,
    as far as `num_samples`; see calibrators.readers). None: `config.calibration` as it is.
    `progress`: a line per block (and a bar on a terminal) on stderr."""
    config = config or QuantizeConfig()
    with tempfile.TemporaryDirectory(prefix="sqonnx-input-") as scratch:
        if isinstance(model, onnx.ModelProto):  # checked before a reader is read: it can be read once only
            if output_path is None:
                raise SqonnxError("a ModelProto has no file name to write beside: give output_path")
            text = calibration is None and (config.calibration.data is None or config.calibration.is_text)
            if text or (isinstance(calibration, (str, Path)) and Path(calibration).suffix != ".npz"):
                raise SqonnxError("a ModelProto has no tokenizer beside it for text calibration: give calibration "
                                  "as feeds (a CalibrationDataReader, feed dicts or an .npz), or pass the model's path")
            model = save_model_proto(model, Path(scratch) / "model")
        config = _with_calibration(config, calibration, Path(scratch))
        return _quantize(Path(model), output_path, config, Progress(progress))


def compare(fp_path: str | Path, quantized_path: str | Path, data: str | Path | None = None, *, samples: int = 8,
            seq_len: int = 512, rounds: int = 3, decode_tokens: int = 32,
            block_bytes: int | None = None) -> CompareReport:
    """FP and quantized models side by side on `data` (text or an .npz of feeds; None: held-out pydoc): perplexity
    or cosine, KL and top-1 agreement of the next-token distributions, prefill and decode speed; big pairs block by
    block (run.compare)."""
    return compare_models(Path(fp_path), Path(quantized_path), Path(data) if data is not None else None, samples,
                          seq_len, rounds, decode_tokens, block_bytes)


def _with_calibration(config: QuantizeConfig, calibration: Calibration, scratch: Path) -> QuantizeConfig:
    if calibration is None:
        return config
    if config.calibration.data is not None:
        raise SqonnxError("calibration is given twice (the calibration argument and config.calibration.data); "
                          "give it once")
    data: Path | tuple[Path, ...]
    if isinstance(calibration, (str, Path)):
        data = Path(calibration)
    elif not is_sample_source(calibration) and isinstance(calibration, (list, tuple)):
        data = tuple(Path(p) for p in calibration)  # several calibration files
    else:  # a reader, feed dicts, or what is neither (refused there, in one line)
        data = save_samples(calibration, scratch, config.calibration.num_samples)
    return replace(config, calibration=replace(config.calibration, data=data))


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
    # (a GPU runtime fuses Q/DQ its own way: a half-precision TensorRT form is unfused on onnxruntime's CPU by design)
    if report.kernels is not None and report.kernels.unfused and rules_of(config.target).cpu_kernels:
        logger.warning("onnxruntime left %d quantized layers unfused (float MatMul after DequantizeLinear): %s",
                       len(report.kernels.unfused), ", ".join(report.kernels.unfused[:5]))
    return report
