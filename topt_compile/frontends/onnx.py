"""ONNX front end: a model file → an onnx_ir model with shapes filled in, ready for matching."""
from __future__ import annotations

import os

import onnx
import onnx_ir as ir
from onnx_ir.passes.common import _c_api_utils

from ..errors import ModelError

SHAPELESS_FRACTION = 0.5  # TorchScript exports: ~99 % shapeless; dynamo: 0-11 % (RoPE Cos/Sin)


def load(path: str | os.PathLike) -> ir.Model:
    """Reads `path` (external data stays lazy) and fills in shapes the exporter left out."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ModelError(f"{path}: no such file")
    try:
        model = ir.load(path)
    except Exception as e:  # onnx raises DecodeError, ValueError, ... : one line for all
        raise ModelError(f"{path}: not a readable ONNX model ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    fill_shapes(model)
    return model


def fill_shapes(model: ir.Model) -> None:
    """Adds ONNX shape inference's results (with data propagation) where the model has none.

    TorchScript exports carry no intermediate shapes; matching needs head counts. ONNX's own
    inference cannot see through Reshape(x, [B, S, -1, Dh]), so ORT's symbolic shape inference
    runs first. Known shapes (the dynamo exporter's symbolic dims) are kept: only unknown dims
    are filled, and a graph whose values all have shapes is left alone.
    """
    values = list(_graph_values(model.graph))
    if sum(v.shape is None for v in values) <= SHAPELESS_FRACTION * len(values):
        return
    try:
        inferred = _c_api_utils.call_onnx_api(_infer, model)
    except Exception:  # a graph no inference handles still matches where the exporter gave shapes
        return
    known = {v.name: v for v in _graph_values(ir.serde.deserialize_model(inferred).graph)}
    for value in _graph_values(model.graph):
        new = known.get(value.name)
        if new is None:
            continue
        if value.dtype is None and new.dtype is not None:
            value.dtype = new.dtype
        if new.shape is None:
            continue
        if value.shape is None:
            value.shape = new.shape
        elif len(value.shape) == len(new.shape) and any(isinstance(d, ir.SymbolicDim) and isinstance(n, int)
                                                        for d, n in zip(value.shape, new.shape)):
            value.shape = ir.Shape([n if isinstance(d, ir.SymbolicDim) and isinstance(n, int) else d
                                    for d, n in zip(value.shape, new.shape)])


def _infer(proto: onnx.ModelProto) -> onnx.ModelProto:
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference
        return SymbolicShapeInference.infer_shapes(proto, auto_merge=True, guess_output_rank=False)
    except Exception:  # unsupported op, inconsistent dims: ONNX's inference is the fallback
        return onnx.shape_inference.infer_shapes(proto, data_prop=True)


def _graph_values(graph: ir.Graph):
    yield from graph.inputs
    for node in graph:
        yield from node.outputs
