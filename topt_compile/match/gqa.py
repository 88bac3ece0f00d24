"""`com.microsoft::GroupQueryAttention` as a site (onnxruntime-genai's model builder writes it).

GQA: query [B,S,Hq·Dh] (or packed QKV [B,S,(Hq+2·Hkv)·Dh] with key/value empty), key/value
[B,S,Hkv·Dh], past_key/past_value [B,Hkv,M,Dh] sharing one max-length buffer with present,
`seqlens_k` int32 [B] (total length − 1 per row), `total_sequence_length`, optionally cos/sin
caches with do_rotary=1 (RoPE inside the op). Causal: query i of row b sits at past_b + i with
past_b = seqlens_k[b] + 1 − S (0 on the first prompt), which is the op's `shared_buffer` layout.

Variants the op cannot express stay dense with the reason: softcap, local_window_size,
smooth_softmax, the qk output, attention_bias, head_sink, quantized-KV inputs, any other attribute.
"""
from __future__ import annotations

import math

from onnxscript.rewriter import pattern
from onnxscript.rewriter._basics import MatchFailureError

from .patterns import DTYPE_NAMES, FLOAT_TYPES, _SiteRule

FORM = "GroupQueryAttention"
DOMAIN = "com.microsoft"
INPUTS = ("query", "key", "value", "past_key", "past_value", "seqlens_k", "total_sequence_length",
          "cos_cache", "sin_cache", "position_ids", "attention_bias", "head_sink")
OUTPUTS = ("output", "present_key", "present_value", "output_qk")
# Attributes and the values the op can express (None: any value).
_ATTRIBUTES = {"num_heads": None, "kv_num_heads": None, "scale": None, "do_rotary": None,
               "rotary_interleaved": None, "softcap": (0.0,), "local_window_size": (-1,),
               "smooth_softmax": (0,), "qk_output": (0,)}
_USABLE_INPUTS = INPUTS[:10]


class GroupQueryAttentionRule(_SiteRule):
    def pattern(self, op, query):
        optional = [pattern.Var(n, can_match_none=True) for n in INPUTS[1:7]]
        return op.GroupQueryAttention(query, *optional, _domain=DOMAIN, _allow_other_inputs=True,
                                      _allow_other_attributes=True, _outputs=["output"])

    def analyze(self, **b):
        node = b["output"].producer()
        attr = {k: a.value for k, a in node.attributes.items()}
        for name, value in attr.items():
            if name not in _ATTRIBUTES:
                raise MatchFailureError(f"attribute {name}={value} is not understood", b["output"])
            allowed = _ATTRIBUTES[name]
            if allowed is not None and value not in allowed:
                raise MatchFailureError(f"{name}={value} is not supported by TopThetaAttention", b["output"])
        inputs = dict(zip(INPUTS, list(node.inputs) + [None] * len(INPUTS)))
        for i, value in enumerate(node.inputs):
            if value is not None and i >= len(_USABLE_INPUTS):
                name = INPUTS[i] if i < len(INPUTS) else f"input {i}"
                raise MatchFailureError(f"{name} is given: not supported by TopThetaAttention", value)
        if len(node.outputs) > 3 and node.outputs[3].uses():
            raise MatchFailureError("output_qk is used: scores cannot be dropped", node.outputs[3])
        query, key, value = inputs["query"], inputs["key"], inputs["value"]
        past_key, past_value = inputs["past_key"], inputs["past_value"]
        if (key is None) != (value is None):
            raise MatchFailureError("only one of key and value is given", key or value)
        if past_key is None or past_value is None:
            raise MatchFailureError("no past_key/past_value buffer: the in-place layout needs one", b["output"])
        if inputs["seqlens_k"] is None:
            raise MatchFailureError("seqlens_k is missing", b["output"])
        if query.shape is not None and len(query.shape) != 3:
            raise MatchFailureError(f"query has rank {len(query.shape)}, expected 3 ([B, S, H·Dh])", query)
        hq, hkv = int(attr.get("num_heads", 0)), int(attr.get("kv_num_heads", 0))
        if hq <= 0 or hkv <= 0 or hq % hkv:
            raise MatchFailureError(f"num_heads={hq} is not a positive multiple of kv_num_heads={hkv}", b["output"])
        rotary = bool(attr.get("do_rotary", 0))
        if rotary and not all(_static_shape(inputs[n]) for n in ("cos_cache", "sin_cache")):
            raise MatchFailureError("do_rotary=1 without cos_cache/sin_cache of known shape", b["output"])
        dtype = query.dtype
        if dtype not in FLOAT_TYPES:
            raise MatchFailureError(f"dtype {dtype} is not supported (float32, float16)", query)
        dh = _head_size(query, hq + (2 * hkv if key is None else 0)) or _last_dim(past_key)
        rotary_dim = 2 * _static_shape(inputs["cos_cache"])[1] if rotary else 0
        if rotary and dh and (rotary_dim > dh or rotary_dim % 2):
            raise MatchFailureError(f"rotary dim {rotary_dim} does not fit head size {dh}", inputs["cos_cache"])
        scale = float(attr.get("scale", 0.0)) or None  # GQA's 0 means 1/sqrt(Dh), as the op's absent scale
        if scale is not None and dh and math.isclose(scale, 1 / math.sqrt(dh), rel_tol=1e-6):
            scale = None
        return {"form": FORM, "Hq": hq, "Hkv": hkv, "Dh": dh, "Dv": dh, "dtype": DTYPE_NAMES[dtype], "mask": "none",
                "is_causal": 1, "scale": scale, "kv_cache": True, "query": query, "key": key, "value": value,
                "past_key": past_key, "past_value": past_value, "output": b["output"],
                "present_key": node.outputs[1] if len(node.outputs) > 1 else None,
                "present_value": node.outputs[2] if len(node.outputs) > 2 else None, "key_layout": "BSD",
                "variant": {"kv_layout": "shared_buffer", "packed_qkv": key is None, "do_rotary": rotary,
                            "rotary_interleaved": bool(attr.get("rotary_interleaved", 0)), "rotary_dim": rotary_dim}}


def _static_shape(value):
    shape = value.shape if value is not None else None
    return list(shape) if shape is not None and all(isinstance(d, int) for d in shape) else None


def _last_dim(value):
    shape = value.shape if value is not None else None
    return shape[-1] if shape is not None and len(shape) and isinstance(shape[-1], int) else None


def _head_size(query, heads: int):
    width = _last_dim(query)
    return width // heads if width and width % heads == 0 else None
