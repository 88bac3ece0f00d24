"""float32 → float16 conversion of a (compiled or dense) model with ONNX Runtime's converter.

    import onnx, topt_compile.fp16
    onnx.save(topt_compile.fp16.convert("sparse.onnx"), "sparse16.onnx")

`onnxruntime.transformers.float16.convert_float_to_float16` blocks ops by type only: an unknown
op gets every float input in float16. TopThetaAttention (and TopThetaGroupQueryAttention) computes in T = float16 but its
`thresholds`, `past_v_sum`, `sdc_log_mass` inputs and `present_v_sum` output are float32
(docs/op.md), so after the converter this puts them back: the thresholds' original float32
initializers (not rounded to float16, not clamped at its smallest positive value), a Cast for a
computed input, float32 types on the VMC state. It also drops the value_info entries the
converter's shape inference added, so that compiling the converted dense model still sees
the shapes it needs (the front end infers them again).
"""
from __future__ import annotations

import os

import onnx
from onnx import TensorProto, helper

from .errors import ModelError
from .ops import schema

_FLOAT32 = ("thresholds", "past_v_sum", "sdc_log_mass")
# op type → its float32 input slots and output slots (TopThetaGroupQueryAttention's likewise)
FLOAT32_SLOTS = {
    schema.OP_TYPE: (tuple(schema.INPUTS.index(n) for n in _FLOAT32), (schema.OUTPUTS.index("present_v_sum"),)),
    schema.GQA_OP_TYPE: (tuple(schema.GQA_INPUTS.index(n) for n in _FLOAT32), (schema.GQA_OUTPUTS.index("present_v_sum"),)),
}


def convert(model: onnx.ModelProto | str | os.PathLike, *, keep_io_types: bool | list[str] = False,
            op_block_list: list[str] | None = None, node_block_list: list[str] | None = None,
            **converter_options) -> onnx.ModelProto:
    """`model` (a ModelProto, not modified, or a path) in float16, TopThetaAttention's float32 slots kept.

    The options are ORT's converter's (`op_block_list` None: its default list). Returns a new
    ModelProto; save it with onnx.save (external data for models over 2 GB).
    """
    from onnxruntime.transformers.float16 import convert_float_to_float16
    proto = _load(model)
    original = {init.name: init for init in proto.graph.initializer}
    had_value_info = {v.name for v in proto.graph.value_info}
    graph_values = {out for node in proto.graph.node for out in node.output}
    converted = convert_float_to_float16(proto, keep_io_types=keep_io_types, op_block_list=op_block_list,
                                         node_block_list=node_block_list, **converter_options)
    graph = converted.graph
    kept = [v for v in graph.value_info if v.name in had_value_info or v.name not in graph_values]
    del graph.value_info[:]
    graph.value_info.extend(kept)
    for node in list(graph.node):
        if node.domain == schema.DOMAIN and node.op_type in FLOAT32_SLOTS:
            inputs, outputs = FLOAT32_SLOTS[node.op_type]
            _keep_float32_inputs(graph, node, original, inputs)
            _keep_float32_outputs(graph, node, outputs)
    return converted


def _load(model) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)  # the converter edits its argument in place
        return copy
    path = os.fspath(model)
    if not os.path.isfile(path):
        raise ModelError(f"{path}: no such file")
    try:
        return onnx.load(path)
    except Exception as e:  # DecodeError, ValueError, ...: one line for all
        raise ModelError(f"{path}: not a readable ONNX model ({type(e).__name__})") from None


def _keep_float32_inputs(graph: onnx.GraphProto, node: onnx.NodeProto, original: dict, slots: tuple) -> None:
    inits = {init.name: init for init in graph.initializer}
    inputs = {v.name: v for v in graph.input}
    for slot in slots:
        name = node.input[slot] if slot < len(node.input) else ""
        if not name:
            continue
        if name in original and original[name].data_type == TensorProto.FLOAT:
            if inits[name].data_type != TensorProto.FLOAT:  # the converter made it float16: restore the original
                shared = sum(name == i for n in graph.node for i in n.input) > 1
                if shared:  # another (float16) consumer: give this slot its own float32 copy
                    node.input[slot] = f"{name}.float32"
                    copy = graph.initializer.add()
                    copy.CopyFrom(original[name])
                    copy.name = node.input[slot]
                else:
                    inits[name].CopyFrom(original[name])
                _set_type(graph, name if not shared else node.input[slot], TensorProto.FLOAT)
        elif name in inputs and inputs[name].type.tensor_type.elem_type == TensorProto.FLOAT16 and \
                all(name not in n.input for n in graph.node if n is not node):
            inputs[name].type.tensor_type.elem_type = TensorProto.FLOAT  # state fed by the caller: float32
        elif _float32_source(graph, name, inputs):
            node.input[slot] = _float32_source(graph, name, inputs)  # keep_io_types: skip the input's Cast
        else:  # a computed value the converter made float16 (a Cast of a float32 value is a no-op)
            cast = f"{name}.float32"
            if cast not in {o for n in graph.node for o in n.output}:
                at = list(graph.node).index(node)  # before its consumer: the graph stays topologically sorted
                graph.node.insert(at, helper.make_node("Cast", [name], [cast], to=TensorProto.FLOAT,
                                                       name=f"{cast}.Cast"))
            node.input[slot] = cast


def _float32_source(graph: onnx.GraphProto, name: str, inputs: dict) -> str | None:
    """The float32 graph input that `name` is a float16 Cast of (keep_io_types), else None."""
    for n in graph.node:
        if name in n.output and n.op_type == "Cast" and n.input[0] in inputs and \
                inputs[n.input[0]].type.tensor_type.elem_type == TensorProto.FLOAT:
            return n.input[0]
    return None


def _keep_float32_outputs(graph: onnx.GraphProto, node: onnx.NodeProto, slots: tuple) -> None:
    for slot in slots:
        name = node.output[slot] if slot < len(node.output) else ""
        if name:
            _set_type(graph, name, TensorProto.FLOAT)


def _set_type(graph: onnx.GraphProto, name: str, elem_type: int) -> None:
    for v in (*graph.value_info, *graph.output, *graph.input):
        if v.name == name and v.type.HasField("tensor_type"):
            v.type.tensor_type.elem_type = elem_type
