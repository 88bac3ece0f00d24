"""Declarative patterns of attention as exporters write it (onnxscript rewriter pattern API).

Two rules, each with its variants folded in by OrValue + a tag:
- `DecomposedAttention`: MatMul(Q, Kᵀ) → scale → [softcap] → mask → [Cast] Softmax [Cast] →
  [Where(IsNaN)] → [Dropout] → MatMul(·, V): torch.onnx dynamo at opset < 23 (torchlib's SDPA),
  eager attention, the TorchScript exporter and optimum.
- `OnnxAttention`: the opset-23 `Attention` node.
Both look through the KV-cache Concat(past, new) and the GQA expansion
Unsqueeze(2) → Expand → Reshape of K and V, so a site's K/V are the Hkv new rows.

`check` turns a structural match into a Site's properties or fails with a reason that names the
value; a structural non-match is not a site at all.
"""
from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import _ir_utils, pattern
from onnxscript.rewriter._basics import MatchFailureError

MASKED_AT_OR_BELOW = -10000.0  # docs/op.md: a float mask value <= this hides its key
DTYPE_NAMES = {ir.DataType.FLOAT: "float32", ir.DataType.FLOAT16: "float16"}
FLOAT_TYPES = tuple(DTYPE_NAMES)


def _cached(op, new, past, axis, tag, present):
    """The KV cache: Concat(past, new) along the sequence axis (the graph's present), or the new rows."""
    return pattern.OrValue([op.Concat(past, new, axis=axis, _outputs=[present]), new], tag_var=tag, tag_values=[True, False])


def _repeated(op, kv, axes, tag):
    """GQA's repeat_kv: Unsqueeze(axis 2) → Expand [B,Hkv,G,T,D] → Reshape [B,Hkv·G,T,D], or none."""
    expanded = op.Reshape(op.Expand(op.Unsqueeze(kv, axes), pattern.ANY_VALUE), pattern.ANY_VALUE)
    return pattern.OrValue([expanded, kv], tag_var=tag, tag_values=[True, False])


def _scaled(op, x, factor, tag, name=None):
    """x·c, x/c, or x: where exporters put the softmax scale (on q, on kᵀ, on qkᵀ)."""
    return pattern.OrValue([op.Mul(x, factor), op.Div(x, factor), x], name=name, tag_var=tag,
                           tag_values=["Mul", "Div", None])


class _SiteRule(pattern.PatternBase):
    """A pattern whose `analyze` returns a site's properties or raises MatchFailureError.

    The failure reason is kept in `self.reason` (PatternBase.match returns None on a failed check).
    """

    props: dict | None = None
    reason: str = ""

    def match(self, *args, **kwargs):
        self.props, self.reason = None, ""
        return super().match(*args, **kwargs)

    def check(self, context, **bindings):
        try:
            self.props = self.analyze(**bindings)
        except MatchFailureError as e:
            self.reason = e.reason
            raise
        return True


class DecomposedAttention(_SiteRule):
    def pattern(self, op, query, key_new, past_key, k_axis, k_unsqueeze, key_bshd,
                value_new, past_value, v_axis, v_unsqueeze,
                q_factor, k_factor, qk_factor, cap_div, cap_mul, mask, fill,
                softmax_axis, cast_in, cast_out1, cast_out2):
        key = _repeated(op, _cached(op, key_new, past_key, k_axis, "k_cache", "present_key"), k_unsqueeze, "k_repeat")
        value = _repeated(op, _cached(op, value_new, past_value, v_axis, "v_cache", "present_value"), v_unsqueeze, "v_repeat")

        # Kᵀ: a transpose of the last two axes, the same through a 3D Reshape, or BSHD → BHDS.
        key_t = pattern.OrValue([
            op.Transpose(key, perm=[0, 1, 3, 2]),
            op.Reshape(op.Transpose(op.Reshape(key, pattern.ANY_VALUE), perm=[0, 2, 1]), pattern.ANY_VALUE),
            op.Transpose(key_bshd, perm=[0, 2, 3, 1]),
        ], tag_var="key_layout", tag_values=["BHSD", "BHSD", "BSHD"])

        q_in = _scaled(op, query, q_factor, "q_scaling", name="q_in")
        scores = op.MatMul(q_in, _scaled(op, key_t, k_factor, "k_scaling"))
        scores = _scaled(op, scores, qk_factor, "qk_scaling")
        # Softcap (Gemma 2): cap·tanh(s/cap). Matched so the report can say why it stays dense.
        capped = op.Mul(op.Tanh(op.Div(scores, cap_div)), cap_mul)
        scores = pattern.OrValue([capped, scores], tag_var="softcap", tag_values=[True, False])
        scores = pattern.OrValue([op.Add(scores, mask), op.Where(mask, scores, fill), scores],
                                 tag_var="mask_kind", tag_values=["float", "bool", "none"])

        # Eager attention runs the softmax in float32 between Casts; the exporters vary the Casts.
        scores = pattern.OrValue([op.Cast(scores, to=cast_in), scores], tag_var="upcast", tag_values=[True, False])
        probs = op.Softmax(scores, axis=softmax_axis)
        probs = pattern.OrValue([op.Cast(op.Cast(probs, to=cast_out1), to=cast_out2), op.Cast(probs, to=cast_out1), probs],
                                tag_var="casts_out", tag_values=[2, 1, 0])
        probs = pattern.OrValue([op.Where(op.IsNaN(probs), 0.0, probs), probs], tag_var="nan_guard", tag_values=[True, False])
        probs = pattern.OrValue([op.Dropout(probs, _allow_other_inputs=True), probs], tag_var="dropout", tag_values=[True, False])
        return op.MatMul(probs, value, _outputs=["output"])

    def analyze(self, **b):
        props = {"form": "sdpa"}
        q_scale, query = _factor(b, "q_scaling", "q_factor"), b["query"]
        if q_scale is None:  # a Mul on q by a non-constant is part of q (e.g. RoPE), not a scale
            q_scale, query = 1.0, b["q_in"]
        k_scale, qk_scale = _factor(b, "k_scaling", "k_factor"), _factor(b, "qk_scaling", "qk_factor")
        for scale, tag in ((k_scale, "k_factor"), (qk_scale, "qk_factor")):
            if scale is None:
                raise MatchFailureError(f"softmax scale {tag} is not a constant scalar", b[tag])
        props["scale"] = q_scale * k_scale * qk_scale
        if b["softcap"]:
            raise MatchFailureError("softcap (cap·tanh(s/cap) on the scores) is not supported by TopThetaAttention", b["cap_div"])
        if _int_attr(b["softmax_axis"]) not in (-1, 3):
            raise MatchFailureError(f"Softmax axis {_int_attr(b['softmax_axis'])} is not the key axis", b["output"])
        if b["mask_kind"] == "bool":
            fill = _ir_utils.get_singleton_value(b["fill"])
            if fill is None or not fill <= MASKED_AT_OR_BELOW:
                raise MatchFailureError(f"Where-mask fill value {fill} does not mask (expected a constant <= {MASKED_AT_OR_BELOW})", b["fill"])
        if b["dropout"]:
            _check_dropout(b["output"])
        for cast in ("cast_in", "cast_out1", "cast_out2"):  # a softmax upcast is exact for the op (fp32 inside)
            to = _int_attr(b.get(cast))
            if to is not None and ir.DataType(to) not in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE):
                raise MatchFailureError(f"softmax Cast to {ir.DataType(to).name} is not a float upcast", b["output"])
        layout = b["key_layout"]
        key = b["key_bshd"] if layout == "BSHD" else b["key_new"]
        _common(props, query, key, b["value_new"], b["past_key"], b["past_value"], b["mask"], b, layout)
        props["variant"] = {k: b[k] for k in ("key_layout", "q_scaling", "k_scaling", "qk_scaling", "mask_kind",
                                             "upcast", "casts_out", "nan_guard", "dropout", "k_cache", "k_repeat")
                            if b.get(k) not in (None, False, 0)}
        props["variant"]["k_repeat"] = bool(b.get("k_repeat"))
        return props


class OnnxAttention(_SiteRule):
    def pattern(self, op, query, key_new, past_key_cat, k_axis, k_unsqueeze,
                value_new, past_value_cat, v_axis, v_unsqueeze):
        key = _repeated(op, _cached(op, key_new, past_key_cat, k_axis, "k_cache", "present_key"), k_unsqueeze, "k_repeat")
        value = _repeated(op, _cached(op, value_new, past_value_cat, v_axis, "v_cache", "present_value"), v_unsqueeze, "v_repeat")
        mask, past_key, past_value = (pattern.Var(n, can_match_none=True) for n in ("mask", "past_key", "past_value"))
        return op.Attention(query, key, value, mask, past_key, past_value, _allow_other_inputs=True,
                            _allow_other_attributes=True, _outputs=["output"])

    def analyze(self, **b):
        props = {"form": "Attention"}
        node = b["output"].producer()
        attr = {k: a.value for k, a in node.attributes.items()}
        if attr.get("softcap", 0.0):
            raise MatchFailureError(f"softcap={attr['softcap']} is not supported by TopThetaAttention", b["output"])
        if "q_num_heads" in attr or "kv_num_heads" in attr or _rank(b["query"]) == 3:
            raise MatchFailureError("3D (BSD) Attention inputs are not supported: expected 4D BHSD", b["query"])
        if len(node.inputs) > 6 and node.inputs[6] is not None:
            raise MatchFailureError("Attention's nonpad_kv_seqlen input is not supported", node.inputs[6])
        if len(node.outputs) > 3 and node.outputs[3].uses():
            raise MatchFailureError("Attention's qk_matmul_output is used: scores cannot be dropped", node.outputs[3])
        internal_past = b.get("past_key") is not None
        if internal_past and (b.get("k_cache") or b.get("k_repeat")):
            raise MatchFailureError("past_key given both as an input and by a Concat", b["past_key"])
        past_key = b["past_key"] if internal_past else b.get("past_key_cat")
        past_value = b["past_value"] if internal_past else b.get("past_value_cat")
        props["scale"] = attr.get("scale")
        props["is_causal"] = int(attr.get("is_causal", 0))
        if props["is_causal"] and past_key is not None and _known_dim(b["query"], 2) != _known_dim(b["key_new"], 2):
            # Both put query i at position P + i, but ORT's Attention ignores causality for S = 1 with a
            # past: the two agree when the new keys are the query's own tokens (Skv = S; docs/op.md).
            raise MatchFailureError("is_causal=1 with a KV cache and a query length that may differ from the new "
                                    "keys' (ONNX Runtime's causal rule is inconsistent there)", b["output"])
        _common(props, b["query"], b["key_new"], b["value_new"], past_key, past_value, b["mask"], b, "BHSD")
        if internal_past:
            props["present_key"] = node.outputs[1] if len(node.outputs) > 1 else None
            props["present_value"] = node.outputs[2] if len(node.outputs) > 2 else None
        props["variant"] = {"k_cache": bool(b.get("k_cache")) or internal_past, "k_repeat": bool(b.get("k_repeat"))}
        return props


def _common(props, query, key, value, past_key, past_value, mask, b, layout):
    """Head counts, dtype, mask and KV-cache checks shared by both forms; fills `props`."""
    if (past_key is None) != (past_value is None) or bool(b.get("k_repeat")) != bool(b.get("v_repeat")):
        raise MatchFailureError("K and V are not cached/expanded alike", [key, value])
    for tag, unsq in (("k_repeat", "k_unsqueeze"), ("v_repeat", "v_unsqueeze")):
        if b.get(tag) and _const_list(b[unsq]) != [2]:
            raise MatchFailureError(f"K/V expansion unsqueezes axes {_const_list(b[unsq])}, not [2] (repeat_kv)", b[unsq])
    for tag, axis in (("k_cache", "k_axis"), ("v_cache", "v_axis")):
        if b.get(tag) and _int_attr(b[axis]) not in (-2, 2):
            raise MatchFailureError(f"KV Concat along axis {_int_attr(b[axis])}, not the sequence axis", b["output"])
    for name, v in (("query", query), ("key", key), ("value", value)):
        if v is None or v.const_value is not None:
            raise MatchFailureError(f"{name} is a constant: not attention", v)
        if _rank(v) not in (None, 4):
            raise MatchFailureError(f"{name} has rank {_rank(v)}, expected 4", v)
    h_axis = 2 if layout == "BSHD" else 1
    hq = _dim(1, query, b["output"])
    hkv = _dim(h_axis, key) or _dim(1, past_key, value, past_value)
    dh = _dim(3, query, key, past_key)
    dv = _dim(3, value, b["output"], past_value)
    if hq is None or hkv is None:
        raise MatchFailureError(f"head counts unknown (Hq={hq}, Hkv={hkv}): the graph lacks shapes", query)
    if hq % hkv:
        raise MatchFailureError(f"Hq={hq} is not a multiple of Hkv={hkv}", key)
    dtype = query.dtype or value.dtype
    if dtype not in FLOAT_TYPES:
        raise MatchFailureError(f"dtype {dtype} is not supported (float32, float16)", query)
    mask_kind = "none"
    if mask is not None:
        mask_kind = "bool" if mask.dtype == ir.DataType.BOOL else "float"
        rank = _rank(mask)
        if rank is None or not 2 <= rank <= 4:
            raise MatchFailureError(f"mask of unknown shape {mask.shape}: expected rank 2-4 broadcastable to [B,Hq,S,T]", mask)
        if rank == 4 and isinstance(mask.shape[1], int) and mask.shape[1] not in (1, hq):
            raise MatchFailureError(f"mask head dim {mask.shape[1]} is neither 1 nor Hq={hq}", mask)
    scale = props.get("scale")
    if scale is not None and dh and math.isclose(scale, 1 / math.sqrt(dh), rel_tol=1e-6):
        scale = None
    props.update(Hq=hq, Hkv=hkv, Dh=dh, Dv=dv, dtype=DTYPE_NAMES[dtype], mask=mask_kind, scale=scale,
                 kv_cache=past_key is not None, query=query, key=key, value=value, attn_mask=mask,
                 past_key=past_key, past_value=past_value, output=b["output"], key_layout=layout)
    if b.get("k_cache"):
        props.update(present_key=b.get("present_key"), present_value=b.get("present_value"))


def _factor(b, tag, name):
    """The scale a Mul/Div tag contributes; None if its operand is not a constant scalar."""
    kind = b.get(tag)
    if kind is None:
        return 1.0
    value = _ir_utils.get_singleton_value(b[name])
    if value is None or not np.isfinite(value) or value == 0:
        return None
    return float(value) if kind == "Mul" else 1.0 / float(value)


def _check_dropout(output: ir.Value):
    node = output.producer().inputs[0].producer()
    ratio = node.inputs[1] if len(node.inputs) > 1 else None
    training = node.inputs[2] if len(node.inputs) > 2 else None
    mode = _const_list(training) if training is not None else [0]
    train = mode is None or any(mode)
    if train and not (ratio is not None and _ir_utils.get_singleton_value(ratio) == 0):
        raise MatchFailureError("Dropout in training mode with a nonzero ratio", node.outputs[0])


def _int_attr(attr) -> int | None:
    return None if attr is None else attr.as_int()


def _const_list(value: ir.Value | None):
    tensor = ir.convenience.get_const_tensor(value) if value is not None else None
    return None if tensor is None else [int(x) for x in np.asarray(tensor.numpy()).reshape(-1)]


def _rank(value: ir.Value | None) -> int | None:
    return None if value is None or value.shape is None else len(value.shape)


def _dim(axis: int, *values: ir.Value | None) -> int | None:
    """The first static size of `axis` among `values` (shapes may be partly symbolic)."""
    for v in values:
        if v is not None and v.shape is not None and len(v.shape) == 4 and isinstance(v.shape[axis], int):
            return v.shape[axis]
    return None


def _known_dim(value: ir.Value, axis: int):
    """A dimension as a comparable token: an int, a symbolic name, or the value itself if unknown."""
    dim = value.shape[axis] if value.shape is not None and len(value.shape) > axis else None
    if isinstance(dim, int):
        return dim
    return getattr(dim, "value", None) or (value, axis)
