"""Calibration: feeds for the FP model, and statistics recorded while onnxruntime runs it."""

from sqonnx.calibrators.channel_max import ActivationStats, Sample
from sqonnx.calibrators.data import CalibrationFeeds, DecodeChain, calibration_feeds, pydoc_text

__all__ = ["ActivationStats", "CalibrationFeeds", "DecodeChain", "Sample", "calibration_feeds", "pydoc_text"]
