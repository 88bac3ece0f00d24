"""The one definition of TopThetaAttention's interface (docs/op.md): names, order, defaults."""
from __future__ import annotations

from dataclasses import dataclass

import onnx
from onnx import helper

DOMAIN = "ai.topt"
OP_TYPE = "TopThetaAttention"
OPSET_VERSION = 1

INPUTS = (
    "Q", "K", "V", "attn_mask", "past_key", "past_value",
    "thresholds", "threshold_lengths", "past_seqlens", "past_v_sum", "sdc_log_mass",
)
OUTPUTS = ("Y", "present_key", "present_value", "present_v_sum", "stats")
REQUIRED_INPUTS = ("Q", "K", "V", "thresholds", "threshold_lengths")

# TopThetaCalibrate (op.md, last section): inputs 0-5 as above, then the column grid; exact top-k
# attention out, with fixed-size per-(head, column) sums for the calibrator.
CALIBRATE_OP_TYPE = "TopThetaCalibrate"
CALIBRATE_INPUTS = ("Q", "K", "V", "attn_mask", "past_key", "past_value", "threshold_lengths")
CALIBRATE_OUTPUTS = ("Y", "present_key", "present_value", "theta_sums", "sdc_sums", "stats")
CALIBRATE_REQUIRED_INPUTS = ("Q", "K", "V", "threshold_lengths")
CALIBRATE_ATTRIBUTES = ("scale", "is_causal", "k", "placement", "compensation")
THETA_SUMS_COLUMNS = ("rows", "theta_sum", "theta_square_sum")
SDC_SUMS_COLUMNS = ("rows", "log_mass_sum")

# TopThetaGroupQueryAttention (op.md, last section): com.microsoft GroupQueryAttention's inputs,
# attributes and first three outputs, plus the θ tables: a one-node drop-in for a GQA node.
GQA_OP_TYPE = "TopThetaGroupQueryAttention"
GQA_INPUTS = ("query", "key", "value", "past_key", "past_value", "seqlens_k", "total_sequence_length",
              "cos_cache", "sin_cache", "position_ids", "thresholds", "threshold_lengths", "past_v_sum", "sdc_log_mass")
GQA_REQUIRED_INPUTS = ("query", "past_key", "past_value", "seqlens_k", "thresholds", "threshold_lengths")
GQA_OUTPUTS = ("output", "present_key", "present_value", "present_v_sum", "stats")
GQA_ATTRIBUTES = ("num_heads", "kv_num_heads", "do_rotary", "rotary_interleaved", "scale", "k", "placement",
                  "compensation", "calibrated_max_length", "dense_prompt")

PLACEMENTS = ("post_softmax", "pre_softmax")
SDC_TOKENS = ("sdc_exact", "sdc_exp_threshold", "sdc_calibrated")
COMPENSATION_TOKENS = ("vmc",) + SDC_TOKENS
KV_LAYOUTS = ("concat", "shared_buffer")
NUM_STATS = 6
STATS_COLUMNS = ("rows", "visible", "kept", "dense_rows", "beyond_calibrated", "group_v_rows")


@dataclass(frozen=True)
class Compensation:
    """A parsed `compensation` attribute: VMC on/off and at most one SDC mode."""

    vmc: bool = True
    sdc: str = "none"  # none | exact | exp_threshold | calibrated

    @classmethod
    def parse(cls, text: str, placement: str = "post_softmax") -> "Compensation":
        tokens = [t for t in text.split("+") if t] if text != "none" else []
        unknown = [t for t in tokens if t not in COMPENSATION_TOKENS]
        if unknown:
            raise ValueError(f"compensation: unknown token {unknown[0]!r} (expected none or +-joined {COMPENSATION_TOKENS})")
        sdc = [t for t in tokens if t in SDC_TOKENS]
        if len(sdc) > 1:
            raise ValueError(f"compensation: at most one sdc_* token, got {'+'.join(sdc)}")
        if sdc and placement != "pre_softmax":
            raise ValueError(f"compensation: {sdc[0]} needs placement=pre_softmax, got {placement}")
        return cls(vmc="vmc" in tokens, sdc=sdc[0][len("sdc_"):] if sdc else "none")

    def __str__(self) -> str:
        tokens = (["sdc_" + self.sdc] if self.sdc != "none" else []) + (["vmc"] if self.vmc else [])
        return "+".join(tokens) or "none"


@dataclass(frozen=True)
class Attributes:
    """TopThetaAttention's attributes with op.md's defaults (scale None: 1/sqrt(Dh))."""

    scale: float | None = None
    is_causal: int = 0
    k: int = 0
    placement: str = "post_softmax"
    compensation: str = "vmc"
    kv_layout: str = "concat"
    calibrated_max_length: int = 0
    dense_prompt: int = 0             # 1: a call with S > 1 (a prompt, a chunk) keeps every key

    def validate(self) -> "Attributes":
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement: expected one of {PLACEMENTS}, got {self.placement!r}")
        if self.kv_layout not in KV_LAYOUTS:
            raise ValueError(f"kv_layout: expected one of {KV_LAYOUTS}, got {self.kv_layout!r}")
        if self.k < 0:
            raise ValueError(f"k: expected >= 0, got {self.k}")
        if self.dense_prompt not in (0, 1):
            raise ValueError(f"dense_prompt: expected 0 or 1, got {self.dense_prompt}")
        if self.is_causal not in (0, 1):
            raise ValueError(f"is_causal: expected 0 or 1, got {self.is_causal}")
        Compensation.parse(self.compensation, self.placement)
        return self

    def onnx_attributes(self) -> dict:
        attrs = {
            "is_causal": self.is_causal, "k": self.k, "placement": self.placement,
            "compensation": self.compensation, "kv_layout": self.kv_layout,
            "calibrated_max_length": self.calibrated_max_length,
        }
        if self.scale is not None:
            attrs["scale"] = float(self.scale)
        if self.dense_prompt:
            attrs["dense_prompt"] = 1
        return attrs


def make_node(inputs: dict[str, str], outputs: dict[str, str], attributes: Attributes, name: str = "") -> onnx.NodeProto:
    """A TopThetaAttention NodeProto; `inputs`/`outputs` map op.md names to value names."""
    return _make(OP_TYPE, INPUTS, REQUIRED_INPUTS, OUTPUTS, inputs, outputs,
                 attributes.validate().onnx_attributes(), name)


def gqa_attributes(attributes: Attributes, num_heads: int, kv_num_heads: int, do_rotary: int = 0,
                   rotary_interleaved: int = 0) -> dict:
    """TopThetaGroupQueryAttention's attributes: GQA's, then TopThetaAttention's less is_causal
    (always 1) and kv_layout (always shared_buffer)."""
    attributes.validate()
    if num_heads <= 0 or kv_num_heads <= 0 or num_heads % kv_num_heads:
        raise ValueError(f"num_heads={num_heads} is not a positive multiple of kv_num_heads={kv_num_heads}")
    attrs = {"num_heads": int(num_heads), "kv_num_heads": int(kv_num_heads), "do_rotary": int(do_rotary),
             "rotary_interleaved": int(rotary_interleaved)}
    attrs.update({n: v for n, v in attributes.onnx_attributes().items() if n in GQA_ATTRIBUTES})
    return attrs


def make_gqa_node(inputs: dict[str, str], outputs: dict[str, str], attrs: dict, name: str = "") -> onnx.NodeProto:
    """A TopThetaGroupQueryAttention NodeProto; `attrs` from gqa_attributes."""
    return _make(GQA_OP_TYPE, GQA_INPUTS, GQA_REQUIRED_INPUTS, GQA_OUTPUTS, inputs, outputs, attrs, name)


def make_calibrate_node(inputs: dict[str, str], outputs: dict[str, str], attributes: Attributes,
                        name: str = "") -> onnx.NodeProto:
    """A TopThetaCalibrate NodeProto (op.md, last section): TopThetaAttention's attributes less
    kv_layout (concat only) and calibrated_max_length (nothing is calibrated yet)."""
    attributes.validate()
    if attributes.kv_layout != "concat":
        raise ValueError(f"kv_layout: {CALIBRATE_OP_TYPE} supports concat only, got {attributes.kv_layout!r}")
    if attributes.calibrated_max_length != 0:
        raise ValueError(f"calibrated_max_length: not an attribute of {CALIBRATE_OP_TYPE}, got {attributes.calibrated_max_length}")
    attrs = {n: v for n, v in attributes.onnx_attributes().items() if n in CALIBRATE_ATTRIBUTES}
    return _make(CALIBRATE_OP_TYPE, CALIBRATE_INPUTS, CALIBRATE_REQUIRED_INPUTS, CALIBRATE_OUTPUTS,
                 inputs, outputs, attrs, name)


def _make(op_type, input_names, required, output_names, inputs, outputs, attrs, name) -> onnx.NodeProto:
    unknown = set(inputs) - set(input_names) | set(outputs) - set(output_names)
    if unknown:
        raise ValueError(f"unknown {op_type} input/output names: {sorted(unknown)}")
    missing = [n for n in required if not inputs.get(n)]
    if missing:
        raise ValueError(f"{op_type} needs inputs {missing}")
    input_list = _trim([inputs.get(n, "") for n in input_names])
    output_list = _trim([outputs.get(n, "") for n in output_names])
    return helper.make_node(op_type, input_list, output_list, name=name, domain=DOMAIN, **attrs)


def opset_import() -> onnx.OperatorSetIdProto:
    return helper.make_opsetid(DOMAIN, OPSET_VERSION)


def _trim(names: list[str]) -> list[str]:
    while names and not names[-1]:
        names.pop()
    return names
