"""Random TopThetaAttention cases (shapes × options × thresholds) and one-node models to run them.

Shared by the reference, CPU-kernel and CUDA-kernel tests: every case draws fresh random inputs
(never zeros) from its own seed.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from topt_compile.ops import schema
from topt_compile.ops.calibrate_reference import top_theta_calibrate
from topt_compile.ops.reference import top_theta_attention

HEADS = [(1, 1), (4, 4), (8, 2), (9, 3)]
HEAD_DIMS = [32, 64, 128]
COMPENSATIONS = {
    "post_softmax": ["none", "vmc"],
    "pre_softmax": ["none", "vmc", "sdc_exact", "sdc_exact+vmc", "sdc_exp_threshold+vmc",
                    "sdc_calibrated+vmc", "sdc_calibrated"],
}
# How thresholds are drawn: from nothing kept to everything kept.
THETA_MODES = ["minus_inf", "mixed", "keep_none", "keep_all"]


@dataclass(frozen=True)
class Case:
    B: int = 1
    Hq: int = 4
    Hkv: int = 4
    S: int = 5
    Skv: int = 5
    P: int = 0                    # concat: past length; shared_buffer: buffer length M
    Dh: int = 32
    Dv: int = 32
    dtype: str = "float32"
    kv_layout: str = "concat"
    is_causal: int = 1
    mask: str = "none"            # none | bool | float
    fully_masked_row: bool = False
    placement: str = "post_softmax"
    compensation: str = "vmc"
    k: int = 0
    theta_mode: str = "mixed"
    with_past_v_sum: bool = False
    dense_prompt: int = 0
    seed: int = 0

    def __str__(self):
        return (f"B{self.B}-H{self.Hq}/{self.Hkv}-S{self.S}-Skv{self.Skv}-P{self.P}-D{self.Dh}/{self.Dv}-{self.dtype}-"
                f"{self.kv_layout}-c{self.is_causal}-m{self.mask}{'F' if self.fully_masked_row else ''}-"
                f"{self.placement}-{self.compensation}-k{self.k}-{self.theta_mode}{'-vs' if self.with_past_v_sum else ''}-s{self.seed}")

    @property
    def attributes(self) -> dict:
        attrs = dict(is_causal=self.is_causal, k=self.k, placement=self.placement,
                     compensation=self.compensation, kv_layout=self.kv_layout,
                     calibrated_max_length=12)
        return attrs | ({"dense_prompt": 1} if self.dense_prompt else {})


def sampled_cases(count: int, seed: int = 0, dtypes=("float32", "float16")) -> list[Case]:
    """A seeded random sample over the option grid, plus one case per option value at least."""
    rng = np.random.default_rng(seed)
    cases = []
    for index in range(count):
        placement = str(rng.choice(list(COMPENSATIONS)))
        layout = str(rng.choice(["concat", "concat", "shared_buffer"]))
        Hq, Hkv = HEADS[rng.integers(len(HEADS))]
        Dh = int(rng.choice(HEAD_DIMS))
        S = int(rng.choice([1, 1, 3, 7, 12]))
        if layout == "concat":
            Skv = S if rng.random() < 0.8 else int(rng.integers(1, 9))
            P = int(rng.choice([0, 0, 4, 19]))
            mask = str(rng.choice(["none", "bool", "float"]))
        else:
            Skv, P, mask = S, S + int(rng.choice([0, 5, 30])), "none"
        cases.append(Case(
            B=int(rng.integers(1, 4)), Hq=Hq, Hkv=Hkv, S=S, Skv=Skv, P=P, Dh=Dh,
            Dv=Dh if rng.random() < 0.8 else 48, dtype=str(rng.choice(dtypes)), kv_layout=layout,
            is_causal=int(rng.integers(2)), mask=mask, fully_masked_row=mask != "none" and rng.random() < 0.3,
            placement=placement, compensation=str(rng.choice(COMPENSATIONS[placement])),
            k=int(rng.choice([0, 0, 3, 10])), theta_mode=str(rng.choice(THETA_MODES, p=[0.15, 0.55, 0.15, 0.15])),
            with_past_v_sum=bool(rng.random() < 0.4), seed=1000 * seed + index))
    return cases


def covering_cases(dtypes=("float32", "float16")) -> list[Case]:
    """Each placement × compensation × θ mode × dtype once, on a GQA shape with past and mask."""
    base = Case(B=2, Hq=8, Hkv=2, S=6, Skv=6, P=11, Dh=64, Dv=64, mask="bool", fully_masked_row=True)
    cases = []
    for index, (dtype, (placement, comps), mode) in enumerate(itertools.product(dtypes, COMPENSATIONS.items(), THETA_MODES)):
        for comp in comps:
            cases.append(replace(base, dtype=dtype, placement=placement, compensation=comp, theta_mode=mode,
                                 seed=500 + index))
    return cases


def make_inputs(case: Case) -> dict[str, np.ndarray]:
    """op.md input name → array for a case (absent optional inputs are left out)."""
    rng = np.random.default_rng(case.seed)
    dt = np.dtype(case.dtype)
    normal = lambda *shape: rng.standard_normal(shape).astype(dt)  # noqa: E731
    inputs = {"Q": normal(case.B, case.Hq, case.S, case.Dh) * dt.type(1.5),
              "K": normal(case.B, case.Hkv, case.Skv, case.Dh), "V": normal(case.B, case.Hkv, case.Skv, case.Dv)}
    if case.kv_layout == "shared_buffer":
        inputs["past_key"] = normal(case.B, case.Hkv, case.P, case.Dh)
        inputs["past_value"] = normal(case.B, case.Hkv, case.P, case.Dv)
        inputs["past_seqlens"] = rng.integers(0, case.P - case.S + 1, size=case.B).astype(np.int32)
    elif case.P:
        inputs["past_key"] = normal(case.B, case.Hkv, case.P, case.Dh)
        inputs["past_value"] = normal(case.B, case.Hkv, case.P, case.Dv)
    total = case.P + (case.Skv if case.kv_layout == "concat" else 0)
    if case.mask != "none":
        shape = [(case.B, 1, case.S, total), (case.S, total), (case.B, case.Hq, case.S, total)][rng.integers(3)]
        keep = rng.random(shape) > 0.25
        if case.fully_masked_row:
            keep[..., 0, :] = False
        if case.mask == "bool":
            inputs["attn_mask"] = keep
        else:  # additive bias on visible keys, finfo.min or -inf on hidden ones
            hidden = dt.type(np.finfo(dt).min) if rng.random() < 0.5 else dt.type(-np.inf)
            inputs["attn_mask"] = np.where(keep, rng.uniform(-1, 0.5, shape), hidden).astype(dt)
    if case.with_past_v_sum:
        inputs["past_v_sum"] = _past_v_sum(case, inputs)
    lengths = np.array([0, 5, 12, 20], dtype=np.int64)
    inputs["threshold_lengths"] = lengths
    inputs["thresholds"] = _thresholds(case, rng, lengths)
    if "sdc_calibrated" in case.compensation:
        inputs["sdc_log_mass"] = rng.uniform(-1.0, 2.0, (case.Hq, len(lengths))).astype(np.float32)
    return inputs


def _thresholds(case: Case, rng, lengths) -> np.ndarray:
    shape = (case.Hq, len(lengths))
    if case.theta_mode == "minus_inf":
        return np.full(shape, -np.inf, np.float32)
    if case.theta_mode == "keep_none":
        return np.full(shape, np.inf if rng.random() < 0.5 else 1e30, np.float32)
    if case.theta_mode == "keep_all":
        return np.full(shape, -1e30 if case.placement == "pre_softmax" else 0.0, np.float32)
    if case.theta_mode == "sparse":  # keeps ~0.1% of the scores: most 16 × 64 tiles of a prompt keep nothing
        if case.placement == "post_softmax":
            return (rng.uniform(8.0, 40.0, shape) / (np.maximum(lengths, 1) + 4)).astype(np.float32)
        return rng.uniform(4.0, 6.0, shape).astype(np.float32)
    if case.placement == "post_softmax":  # around 1/n: keeps a few of each row
        n = np.maximum(lengths, 1) + 4
        return (rng.uniform(0.3, 3.0, shape) / n).astype(np.float32)
    return rng.uniform(-0.5, 2.5, shape).astype(np.float32)  # scores are ~N(0, 1.5²)


def _past_v_sum(case: Case, inputs) -> np.ndarray:
    """The running sum a previous step would have produced: the past rows the rows here see."""
    if "past_value" not in inputs:  # no past: the running sum starts from zero
        return np.zeros((case.B, case.Hkv, case.Dv), np.float32)
    v = inputs["past_value"].astype(np.float64)
    if case.kv_layout == "shared_buffer":
        valid = np.arange(case.P)[None, :] < inputs["past_seqlens"][:, None]
        return np.einsum("bgtd,bt->bgd", v, valid).astype(np.float32)
    if "attn_mask" not in inputs:
        return v.sum(axis=2).astype(np.float32)
    # With a random mask, past visibility differs per row; op.md defines v̄ from past_v_sum as
    # given, so any plausible sum is a valid test input.
    return (v.sum(axis=2) * 0.5).astype(np.float32)


def reference_outputs(case: Case, inputs: dict, nudge: bool = True):
    """The reference's outputs; with `nudge`, θ is moved away from near-ties first (in place)."""
    for _ in range(20):
        outputs, margin = top_theta_attention(**inputs, **case.attributes, return_decision_margin=True)
        if not nudge or margin > 4e-6:  # float32 scores differ from float64 by ~1e-6 here
            return outputs
        inputs["thresholds"] = np.where(np.isfinite(inputs["thresholds"]),
                                        inputs["thresholds"] * np.float32(1.003) + np.float32(1e-3),
                                        inputs["thresholds"]).astype(np.float32)
    raise AssertionError(f"{case}: could not move thresholds away from the scores")


ONNX_TYPES = {np.dtype("float32"): TensorProto.FLOAT, np.dtype("float16"): TensorProto.FLOAT16,
              np.dtype("float64"): TensorProto.DOUBLE,
              np.dtype("bool"): TensorProto.BOOL, np.dtype("int32"): TensorProto.INT32,
              np.dtype("int64"): TensorProto.INT64}
TABLE_INPUTS = ("thresholds", "threshold_lengths", "sdc_log_mass")


def one_op_model(case: Case, inputs: dict, outputs=schema.OUTPUTS, node_name="tta") -> onnx.ModelProto:
    """A model of one TopThetaAttention node; the θ tables are initializers, as in compiled models."""
    node = schema.make_node({n: n for n in inputs}, {o: o for o in outputs},
                            schema.Attributes(**case.attributes), name=node_name)
    return _one_node_model(node, inputs, outputs)


def one_calibrate_model(case: Case, inputs: dict, outputs=schema.CALIBRATE_OUTPUTS, node_name="ttc") -> onnx.ModelProto:
    """A model of one TopThetaCalibrate node (case.attributes less kv_layout/calibrated_max_length)."""
    node = schema.make_calibrate_node({n: n for n in inputs}, {o: o for o in outputs},
                                      schema.Attributes(**calibrate_attributes(case)), name=node_name)
    return _one_node_model(node, inputs, outputs)


def calibrate_attributes(case: Case) -> dict:
    return {n: v for n, v in case.attributes.items() if n in schema.CALIBRATE_ATTRIBUTES}


def _one_node_model(node, inputs: dict, outputs) -> onnx.ModelProto:
    dtype = inputs["Q"].dtype
    out_types = {"Y": dtype, "present_key": dtype, "present_value": dtype,
                 "present_v_sum": np.dtype("float32"), "stats": np.dtype("int64"),
                 "theta_sums": np.dtype("float64"), "sdc_sums": np.dtype("float64")}
    graph = helper.make_graph(
        [node], "top_theta_one_op",
        [helper.make_tensor_value_info(n, ONNX_TYPES[a.dtype], None) for n, a in inputs.items() if n not in TABLE_INPUTS],
        [helper.make_tensor_value_info(o, ONNX_TYPES[out_types[o]], None) for o in outputs],
        initializer=[numpy_helper.from_array(a, n) for n, a in inputs.items() if n in TABLE_INPUTS])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), schema.opset_import()],
                             ir_version=10)


def feeds(inputs: dict) -> dict:
    return {n: a for n, a in inputs.items() if n not in TABLE_INPUTS}


def attention23(inputs: dict, is_causal: int, scale=None) -> np.ndarray:
    """ONNX Runtime's own opset-23 Attention on the same inputs: the dense oracle."""
    names = ["Q", "K", "V", "attn_mask", "past_key", "past_value"]
    present = [n for n in names if n in inputs]
    dt = TensorProto.FLOAT16 if inputs["Q"].dtype == np.float16 else TensorProto.FLOAT
    types = {n: (TensorProto.BOOL if inputs[n].dtype == bool else dt) for n in present}
    attrs = {"is_causal": is_causal} | ({"scale": scale} if scale is not None else {})
    outputs = ["Y", "present_key", "present_value"] if "past_key" in inputs else ["Y"]
    node = helper.make_node("Attention", [n if n in inputs else "" for n in names], outputs, **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(n, types[n], None) for n in present],
                              [helper.make_tensor_value_info(o, dt, None) for o in outputs])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {n: inputs[n] for n in present})[0]


def comparable_with_attention23(case) -> bool:
    """ORT's Attention-23 agrees with op.md's causal rule (query i at P + i) when Skv = S, the case
    exporters produce; with Skv != S it is inconsistent (S = 1 with past sees every key)."""
    return case.kv_layout == "concat" and not (case.is_causal and case.Skv != case.S)


# --- TopThetaCalibrate ----------------------------------------------------------------------------
CALIBRATE_LENGTHS = np.array([0, 5, 12, 20], dtype=np.int64)


def calibrate_cases(count: int, seed: int = 0, dtypes=("float32", "float16")) -> list[Case]:
    """sampled_cases in the concat layout (the only one TopThetaCalibrate has), with a past of the
    shared-buffer draws' length, plus a covering set: GQA 8/2 and 9/3 with past and a bool mask
    with a fully masked row, every dtype × placement × compensation, k = 3 and 10."""
    sampled = [replace(c, kv_layout="concat", with_past_v_sum=False, theta_mode="mixed")
               for c in sampled_cases(count, seed, dtypes)]
    covering = []
    for dtype, (placement, comps), (Hq, Hkv), k in itertools.product(
            dtypes, COMPENSATIONS.items(), [(8, 2), (9, 3)], [3, 10]):
        for comp in comps:
            covering.append(Case(B=2, Hq=Hq, Hkv=Hkv, S=6, Skv=6, P=11, Dh=64, Dv=64, dtype=dtype, mask="bool",
                                 fully_masked_row=True, placement=placement, compensation=comp, k=k,
                                 seed=700 + len(covering)))
    return covering + sampled


def calibrate_inputs(case: Case, lengths=CALIBRATE_LENGTHS, min_gap=1e-4):
    """(case, inputs, reference outputs) for TopThetaCalibrate: inputs 0-5 of the case plus
    threshold_lengths. Redraws (a new seed) while some row's k-th and (k+1)-th largest scores are
    closer than `min_gap`, which float32 could order otherwise."""
    for attempt in range(20):
        drawn = make_inputs(case)
        inputs = {n: drawn[n] for n in schema.CALIBRATE_INPUTS if n in drawn}
        inputs["threshold_lengths"] = lengths
        outputs, gap = top_theta_calibrate(**inputs, **calibrate_attributes(case), return_decision_margin=True)
        if gap > min_gap:
            return case, inputs, outputs
        case = replace(case, seed=case.seed + 100_000)
    raise AssertionError(f"{case}: could not draw inputs without near-ties")
