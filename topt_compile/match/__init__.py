"""Attention-site matching: declarative patterns over onnx_ir; returns sites, edits nothing."""
from .find import find_sites
from .site import DENSE, MATCHED, Site, fingerprint

__all__ = ["find_sites", "Site", "MATCHED", "DENSE", "fingerprint"]
