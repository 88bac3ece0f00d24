"""Thresholds: the versioned t.json schema and calibration (ONNX Runtime: calibrate.py; PyTorch: calibrate_torch.py)."""
from .schema import SiteThresholds, ThresholdTable

__all__ = ["SiteThresholds", "ThresholdTable"]
