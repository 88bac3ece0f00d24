"""Cases and one-node models for TopThetaGroupQueryAttention (op.md, last section) and the
com.microsoft GroupQueryAttention node it replaces."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from topt_compile.ops import schema
from topt_compile.ops.reference import top_theta_group_query_attention

LENGTHS = np.array([0, 8, 24], np.int64)
ELEM = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}
OUTPUT_TYPES = {"present_v_sum": TensorProto.FLOAT, "stats": TensorProto.INT64}


@dataclass(frozen=True)
class GqaCase:
    B: int = 2
    S: int = 1
    past: tuple = (5, 9)         # past rows per batch row (seqlens_k = past + S - 1)
    M: int = 32                  # buffer rows
    Hq: int = 6
    Hkv: int = 2
    D: int = 16
    packed: bool = True
    rotary: bool = True
    interleaved: bool = False
    rotary_dim: int = 16
    positions: bool = False      # position_ids given (else past_b + s)
    dtype: str = "float32"
    placement: str = "post_softmax"
    compensation: str = "vmc"
    k: int = 2
    dense_prompt: int = 0
    seed: int = 0

    def __str__(self):
        return (f"B{self.B}S{self.S}p{'-'.join(map(str, self.past))}M{self.M}H{self.Hq}/{self.Hkv}D{self.D}"
                f"{'-packed' if self.packed else ''}{f'-rot{self.rotary_dim}' if self.rotary else ''}"
                f"{'i' if self.interleaved else ''}{'-pos' if self.positions else ''}-{self.dtype}-{self.placement}"
                f"-{self.compensation}")

    @property
    def gqa_attributes(self) -> dict:
        return dict(num_heads=self.Hq, kv_num_heads=self.Hkv, do_rotary=int(self.rotary),
                    rotary_interleaved=int(self.interleaved))

    @property
    def attributes(self) -> dict:
        return schema.gqa_attributes(schema.Attributes(k=self.k, placement=self.placement, compensation=self.compensation,
                                                       dense_prompt=self.dense_prompt),
                                     self.Hq, self.Hkv, int(self.rotary), int(self.interleaved))


def gqa_inputs(case: GqaCase, theta: str = "finite") -> dict[str, np.ndarray]:
    rng = np.random.default_rng(case.seed)
    dt = np.dtype(case.dtype)
    normal = lambda *shape: rng.standard_normal(shape).astype(dt)  # noqa: E731
    B, S, D = case.B, case.S, case.D
    inputs = {}
    if case.packed:
        inputs["query"] = normal(B, S, (case.Hq + 2 * case.Hkv) * D)
    else:
        inputs.update(query=normal(B, S, case.Hq * D), key=normal(B, S, case.Hkv * D), value=normal(B, S, case.Hkv * D))
    inputs["past_key"] = normal(B, case.Hkv, case.M, D)
    inputs["past_value"] = normal(B, case.Hkv, case.M, D)
    inputs["seqlens_k"] = (np.asarray(case.past) + S - 1).astype(np.int32)
    inputs["total_sequence_length"] = np.array(max(case.past) + S, np.int32)
    if case.rotary:
        max_pos, half = case.M + 8, case.rotary_dim // 2
        angles = np.arange(max_pos)[:, None] * (10000.0 ** (-np.arange(half) / half))[None, :]
        inputs["cos_cache"], inputs["sin_cache"] = np.cos(angles).astype(dt), np.sin(angles).astype(dt)
        if case.positions:
            inputs["position_ids"] = (np.asarray(case.past)[:, None] + np.arange(S)[None, :] + 3).astype(np.int64)
    n = np.maximum(LENGTHS, 1) + 4
    if theta == "minus_inf":
        inputs["thresholds"] = np.full((case.Hq, len(LENGTHS)), -np.inf, np.float32)
    elif case.placement == "post_softmax":
        inputs["thresholds"] = (rng.uniform(0.3, 3.0, (case.Hq, len(LENGTHS))) / n).astype(np.float32)
    else:
        inputs["thresholds"] = rng.uniform(-0.5, 2.0, (case.Hq, len(LENGTHS))).astype(np.float32)
    inputs["threshold_lengths"] = LENGTHS
    return inputs


def reference(case: GqaCase, inputs: dict):
    """The reference's outputs, θ moved off near-ties first (in place), as op_cases.reference_outputs."""
    from topt_compile.ops import reference as ref
    for _ in range(20):
        q, k, v, past = ref.gqa_front(inputs["query"], inputs.get("key"), inputs.get("value"), inputs["seqlens_k"],
                                      inputs.get("cos_cache"), inputs.get("sin_cache"), inputs.get("position_ids"),
                                      **case.gqa_attributes)
        _, margin = ref.top_theta_attention(q, k, v, None, inputs["past_key"], inputs["past_value"], inputs["thresholds"],
                                            LENGTHS, past, is_causal=1, k=case.k, placement=case.placement,
                                            compensation=case.compensation, kv_layout="shared_buffer",
                                            dense_prompt=case.dense_prompt, return_decision_margin=True)
        if margin > 4e-6:
            break
        t = inputs["thresholds"]
        inputs["thresholds"] = np.where(np.isfinite(t), t * np.float32(1.003) + np.float32(1e-3), t).astype(np.float32)
    return top_theta_group_query_attention(**inputs, **{n: v for n, v in case.attributes.items()})


def topt_gqa_model(case: GqaCase, inputs: dict, outputs=("output", "present_key", "present_value")):
    """One TopThetaGroupQueryAttention node; thresholds are an input (a step may move them)."""
    names = {n: n for n in inputs if n in schema.GQA_INPUTS}
    node = schema.make_gqa_node(names, {o: o for o in outputs}, case.attributes, name="ttg")
    return _model(node, inputs, outputs, case, initializers=("threshold_lengths",))


def ort_gqa_model(case: GqaCase, inputs: dict):
    """The com.microsoft GroupQueryAttention node the op replaces (same inputs, less the θ tables)."""
    gqa_inputs = ("query", "key", "value", "past_key", "past_value", "seqlens_k", "total_sequence_length",
                  "cos_cache", "sin_cache", "position_ids")
    names = [n if n in inputs else "" for n in gqa_inputs]
    while not names[-1]:
        names.pop()
    node = helper.make_node("GroupQueryAttention", names, ["output", "present_key", "present_value"],
                            domain="com.microsoft", name="gqa", **case.gqa_attributes)
    return _model(node, {n: a for n, a in inputs.items() if n in gqa_inputs}, ("output", "present_key", "present_value"),
                  case, initializers=())


def _model(node, inputs, outputs, case, initializers):
    def info(name, a):
        elem = {np.dtype("int32"): TensorProto.INT32, np.dtype("int64"): TensorProto.INT64}.get(
            a.dtype, TensorProto.FLOAT if a.dtype == np.float32 else ELEM[case.dtype])
        return helper.make_tensor_value_info(name, elem, None)
    graph = helper.make_graph([node], "gqa", [info(n, a) for n, a in inputs.items() if n not in initializers],
                              [helper.make_tensor_value_info(o, OUTPUT_TYPES.get(o, ELEM[case.dtype]), None) for o in outputs],
                              initializer=[numpy_helper.from_array(inputs[n], n) for n in initializers])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1),
                                                   schema.opset_import()], ir_version=10)


def feeds(inputs: dict, initializers=("threshold_lengths",)) -> dict:
    return {n: a for n, a in inputs.items() if n not in initializers}
