"""Calibration: feeds for the FP model, and statistics recorded while onnxruntime runs it."""

from sqonnx.calibrators.channel_max import collect_channel_max
from sqonnx.calibrators.data import CalibrationFeeds, calibration_feeds, pydoc_text

__all__ = ["CalibrationFeeds", "calibration_feeds", "collect_channel_max", "pydoc_text"]
