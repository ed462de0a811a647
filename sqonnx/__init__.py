"""sqonnx: SmoothQuant W8A8 INT8 quantization for ONNX transformer models."""

from sqonnx.api import quantize
from sqonnx.config import CalibMethod, CalibrationConfig, Format, Level, QuantizeConfig, Rounding, Unabsorbed, Weights
from sqonnx.errors import SqonnxError
from sqonnx.report import LayerReport, QuantizeReport
from sqonnx.target import Target

__version__ = "0.1.0"

__all__ = ["CalibMethod", "CalibrationConfig", "Format", "LayerReport", "Level", "QuantizeConfig", "QuantizeReport",
           "Rounding", "SqonnxError", "Target", "Unabsorbed", "Weights", "__version__", "quantize"]
