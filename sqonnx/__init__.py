"""sqonnx: SmoothQuant W8A8 INT8 quantization for ONNX transformer models."""

from sqonnx.api import quantize
from sqonnx.config import CalibrationConfig, Level, QuantizeConfig, Unabsorbed
from sqonnx.errors import SqonnxError
from sqonnx.report import LayerReport, QuantizeReport

__version__ = "0.1.0"

__all__ = ["CalibrationConfig", "LayerReport", "Level", "QuantizeConfig", "QuantizeReport", "SqonnxError",
           "Unabsorbed", "__version__", "quantize"]
