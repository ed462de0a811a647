"""Calibration: feeds for the FP model, and statistics recorded while onnxruntime runs it."""

from sqonnx.calibrators.channel_max import ActivationStats, collect_channel_max, collect_statistics
from sqonnx.calibrators.data import CalibrationFeeds, calibration_feeds, pydoc_text

__all__ = ["ActivationStats", "CalibrationFeeds", "calibration_feeds", "collect_channel_max", "collect_statistics",
           "pydoc_text"]
