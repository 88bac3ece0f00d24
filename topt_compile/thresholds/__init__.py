"""Thresholds: the versioned t.json schema (calibration comes later)."""
from .schema import SiteThresholds, ThresholdTable

__all__ = ["SiteThresholds", "ThresholdTable"]
