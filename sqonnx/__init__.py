"""sqonnx: SmoothQuant W8A8 INT8 quantization for ONNX transformer models."""

from sqonnx.runtime.install import check_onnxruntime

check_onnxruntime()

from sqonnx.api import compare, quantize  # noqa: E402
from sqonnx.config import (  # noqa: E402
    CalibMethod,
    CalibrationConfig,
    Format,
    Level,
    Provider,
    QuantizeConfig,
    Rounding,
    Unabsorbed,
    Weights,
)
from sqonnx.errors import SqonnxError  # noqa: E402
from sqonnx.judgements.layer_report import LayerReport  # noqa: E402
from sqonnx.report import QuantizeReport  # noqa: E402
from sqonnx.targets import Target  # noqa: E402

__version__ = "0.1.0"

__all__ = ["CalibMethod", "CalibrationConfig", "Format", "LayerReport", "Level", "QuantizeConfig", "QuantizeReport",
           "Provider", "Rounding", "SqonnxError", "Target", "Unabsorbed", "Weights", "__version__", "compare",
           "quantize"]
