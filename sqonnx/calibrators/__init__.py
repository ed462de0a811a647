"""Calibration: feeds for the FP model, and statistics recorded while onnxruntime runs it."""

from sqonnx.calibrators.channel_max import ActivationStats, Sample, collect_channel_max, collect_statistics
from sqonnx.calibrators.data import CalibrationFeeds, DecodeChain, calibration_feeds, pydoc_text

__all__ = ["ActivationStats", "CalibrationFeeds", "DecodeChain", "Sample", "calibration_feeds", "collect_channel_max",
           "collect_statistics", "pydoc_text"]
