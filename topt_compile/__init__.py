"""topt: Top-θ attention for exported transformer models.

Front ends (ONNX, torch.fx) → attention-site matching → thresholds → rewrite → the
`ai.topt::TopThetaAttention` custom op (docs/op.md), run by the library this package ships.
"""
__version__ = "0.1.0"


def get_library_path() -> str:
    """Path of the ONNX Runtime custom-op library: `SessionOptions.register_custom_ops_library(path)`."""
    from ._library import get_library_path as _get

    return _get()
