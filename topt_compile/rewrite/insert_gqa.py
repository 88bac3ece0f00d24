"""Passes on GroupQueryAttention sites.

InsertTopThetaGQA: each GQA node → one TopThetaGroupQueryAttention node, which takes GQA's own
inputs (packed or separate QKV, in-place KV buffers, seqlens_k, cos/sin caches) and does GQA's
unpacking and RoPE inside (op.md, last section). past_key/past_value and present_key/present_value
carry over unchanged, so a runtime that binds present to the past buffer (onnxruntime-genai's
past_present_share_buffer) keeps decoding in place.

InsertTopThetaCalibrateGQA: calibration builds TopThetaAttention's inputs from GQA's with
standard nodes (attention_inputs: Reshape, Split, Transpose, RotaryEmbedding at positions
past_b + i, past_seqlens = max(seqlens_k + 1 − S, 0)); speed does not matter there.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ..match.gqa import FORM, INPUTS
from ..match.site import Site
from ..ops import schema
from ..thresholds.schema import ThresholdTable
from .insert_top_theta import _initializer, _take_over

_BHSD = [0, 2, 1, 3]  # [B,S,H,D] ↔ [B,H,S,D]


def is_gqa(site: Site) -> bool:
    return site.form == FORM


class InsertTopThetaGQA(ir.passes.InPlacePass):
    """Each matched GroupQueryAttention node → one TopThetaGroupQueryAttention node (op.md, last
    section) on the same inputs plus the θ tables: one node runs where one ran. Thresholds become
    initializers as in InsertTopThetaAttention; `stats` exposes each node's stats as graph output
    `topt.<site>.stats`."""

    def __init__(self, sites: list[Site], table: ThresholdTable, stats: bool = False, dense_prompt: bool = False):
        super().__init__()
        self.sites = [s for s in sites if s.matched and is_gqa(s) and s.id in table.sites]
        self.table = table
        self.stats = stats
        self.dense_prompt = dense_prompt

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        position = {id(node): i for i, node in enumerate(graph)}
        for site in self.sites:
            anchor = site.output.producer()
            node = self._node(graph, site, self.table.sites[site.id], anchor)
            for new, old in zip(node.outputs[:3], (site.output, site.present_key, site.present_value)):
                _take_over(graph, old, new, position, position[id(anchor)], everywhere=True)
        for opsets in (model.opset_imports, graph.opset_imports):
            opsets[schema.DOMAIN] = schema.OPSET_VERSION
        return ir.passes.PassResult(model, modified=bool(self.sites))

    def _node(self, graph, site, t, anchor) -> ir.Node:
        prefix = f"topt.{site.id}"
        inputs = dict(zip(INPUTS, list(anchor.inputs)))
        inputs["thresholds"] = _initializer(graph, f"{prefix}.thresholds", np.asarray(t.thresholds, np.float32))
        inputs["threshold_lengths"] = _initializer(graph, f"{prefix}.threshold_lengths",
                                                   np.asarray(t.threshold_lengths, np.int64))
        if t.sdc_log_mass is not None:
            inputs["sdc_log_mass"] = _initializer(graph, f"{prefix}.sdc_log_mass", np.asarray(t.sdc_log_mass, np.float32))
        attrs = schema.gqa_attributes(
            schema.Attributes(scale=site.scale, is_causal=1, k=t.k, placement=t.placement, compensation=t.compensation,
                              kv_layout="shared_buffer", calibrated_max_length=t.calibrated_max_length,
                              dense_prompt=int(self.dense_prompt)),
            site.Hq, site.Hkv, int(site.variant["do_rotary"]), int(site.variant["rotary_interleaved"]))
        values = [inputs.get(name) for name in schema.GQA_INPUTS]
        while values[-1] is None:
            values.pop()
        node = ir.Node(schema.DOMAIN, schema.GQA_OP_TYPE, values, ir.convenience.convert_attributes(attrs),
                       num_outputs=len(schema.GQA_OUTPUTS) if self.stats else 3, name=f"{prefix}/{schema.GQA_OP_TYPE}",
                       version=schema.OPSET_VERSION)
        for new, old, name in zip(node.outputs[:3], (site.output, site.present_key, site.present_value), schema.GQA_OUTPUTS):
            new.name, new.dtype, new.shape = f"{prefix}.{name}", old.dtype, old.shape
        if self.stats:
            stats = node.outputs[schema.GQA_OUTPUTS.index("stats")]
            stats.name, stats.dtype = f"{prefix}.stats", ir.DataType.INT64
            stats.shape = ir.Shape([None, site.Hq, schema.NUM_STATS])
            graph.outputs.append(stats)
        graph.insert_before(anchor, node)
        return node


def attention_inputs(graph: ir.Graph, site: Site, anchor: ir.Node, shared: dict) -> tuple[ir.Value, ...]:
    """Inserts, before the GQA node `anchor`, the nodes giving the op's Q [B,Hq,S,Dh], K/V
    [B,Hkv,S,Dh] (rotated like GQA's) and past_seqlens int32 [B]; returns those four values.
    `shared` (one dict per graph, sites in graph order) keeps the per-graph values."""
    prefix = f"topt.{site.id}"
    gqa = dict(zip(INPUTS, list(anchor.inputs) + [None] * len(INPUTS)))

    def add(op, inputs, name, **attrs):
        return _add(graph, anchor, op, inputs, f"{prefix}/{name}", **attrs)

    # S, past_seqlens and the rotary positions are the same for every layer (one seqlens_k input):
    # computed once, before the first site, and shared (fewer nodes run per decode step).
    def once(op, inputs, name, **attrs):
        return _add(graph, anchor, op, inputs, f"topt.gqa/{name}", **attrs)

    per_graph = shared.setdefault(id(gqa["seqlens_k"]), {})
    if not per_graph:
        seq = once("Shape", [site.query], "S", start=1, end=2)                                           # int64 [1]
        past = once("Sub", [once("Add", [gqa["seqlens_k"], _const(graph, "topt.gqa.one_i32", np.int32(1))], "total"),
                            once("Cast", [seq], "S_i32", to=ir.DataType.INT32)], "past_or_negative")
        per_graph["S"] = seq
        per_graph["past_seqlens"] = once("Max", [past, _const(graph, "topt.gqa.zero_i32", np.int32(0))], "past_seqlens")
    past_seqlens = per_graph["past_seqlens"]                                                          # int32 [B]

    if site.variant["packed_qkv"]:  # [B,S,(Hq+2Hkv)·Dh] → [B,S,Hq+2Hkv,Dh] → three [B,S,H,Dh]
        heads = _const(graph, f"topt.gqa.packed_{site.Hq}_{site.Hkv}", [0, 0, site.Hq + 2 * site.Hkv, -1])
        split = ir.node("Split", [add("Reshape", [site.query, heads], "QKV_BSHD"),
                                  _const(graph, f"topt.gqa.split_{site.Hq}_{site.Hkv}", [site.Hq, site.Hkv, site.Hkv])],
                        {"axis": 2}, num_outputs=3, name=f"{prefix}/QKV_split")
        graph.insert_before(anchor, split)
        q, k, v = split.outputs
    else:
        q, k, v = (add("Reshape", [x, _const(graph, f"topt.gqa.heads_{h}", [0, 0, h, -1])], f"{n}_BSHD")
                   for x, h, n in ((site.query, site.Hq, "Q"), (site.key, site.Hkv, "K"), (site.value, site.Hkv, "V")))
    q, k, v = (add("Transpose", [x], f"{n}_BHSD", perm=_BHSD) for x, n in ((q, "Q"), (k, "K"), (v, "V")))

    if site.variant["do_rotary"]:
        positions = gqa["position_ids"]
        if positions is None and "positions" not in per_graph:  # past_b + i, [B, S] int64
            steps = once("Range", [_const(graph, "topt.gqa.zero_i64", np.int64(0)), once("Squeeze", [per_graph["S"]], "S_scalar"),
                                   _const(graph, "topt.gqa.one_i64", np.int64(1))], "steps")
            start = once("Unsqueeze", [once("Cast", [past_seqlens], "past_i64", to=ir.DataType.INT64),
                                       _const(graph, "topt.gqa.axis1", [1])], "past_column")
            per_graph["positions"] = once("Add", [start, once("Unsqueeze", [steps, _const(graph, "topt.gqa.axis0", [0])],
                                                             "steps_row")], "position_ids")
        if positions is None:
            positions = per_graph["positions"]
        rotary = {"interleaved": int(site.variant["rotary_interleaved"])}
        if site.Dh is None or site.variant["rotary_dim"] < site.Dh:  # partial rotary: the first rotary_dim of each head
            rotary.update(rotary_embedding_dim=site.variant["rotary_dim"])
        q, k = (_add(graph, anchor, "RotaryEmbedding", [x, positions, gqa["cos_cache"], gqa["sin_cache"]],
                     f"{prefix}/{n}_rotary", domain="com.microsoft", **rotary) for x, n in ((q, "Q"), (k, "K")))
    return q, k, v, past_seqlens


def _add(graph: ir.Graph, before: ir.Node, op: str, inputs, name: str, domain: str = "", **attrs) -> ir.Value:
    node = ir.node(op, inputs, attrs, domain=domain, name=name)
    graph.insert_before(before, node)
    return node.outputs[0]


def _const(graph: ir.Graph, name: str, value) -> ir.Value:
    """A shared constant initializer (int64 for lists); created once per graph."""
    if name in graph.initializers:
        return graph.initializers[name]
    array = np.asarray(value, np.int64) if isinstance(value, list) else np.asarray(value)
    return _initializer(graph, name, array)


class InsertTopThetaCalibrateGQA(ir.passes.InPlacePass):
    """Calibration (rewrite/insert_calibrate.py) for GroupQueryAttention sites: TopThetaCalibrate on
    the same Q/K/V, `concat` layout with no past (the op has no shared_buffer form). Valid for
    what calibration feeds: one prompt, an empty KV cache; the KV outputs are not produced."""

    def __init__(self, sites: list[Site], spec):
        super().__init__()
        self.sites = [s for s in sites if s.matched and is_gqa(s) and s.id in spec.k]
        self.spec = spec

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from .insert_calibrate import output_name
        graph = model.graph
        position = {id(node): i for i, node in enumerate(graph)}
        shared = {}
        lengths = _const(graph, "topt.calibrate.threshold_lengths", list(self.spec.threshold_lengths))
        exposed = [name for name in schema.CALIBRATE_OUTPUTS[3:] if (self.spec.stats if name == "stats" else self.spec.sums)]
        for site in sorted(self.sites, key=lambda s: position[id(s.output.producer())]):
            anchor = site.output.producer()
            prefix = f"topt.{site.id}"
            q, k, v, _ = attention_inputs(graph, site, anchor, shared)
            attrs = schema.Attributes(scale=site.scale, is_causal=1, k=self.spec.k[site.id], placement=self.spec.placement,
                                      compensation=self.spec.compensation).validate()
            attrs = {n: a for n, a in attrs.onnx_attributes().items() if n in schema.CALIBRATE_ATTRIBUTES}
            node = ir.Node(schema.DOMAIN, schema.CALIBRATE_OP_TYPE, [q, k, v, None, None, None, lengths],
                           ir.convenience.convert_attributes(attrs), num_outputs=len(schema.CALIBRATE_OUTPUTS),
                           name=f"{prefix}/{schema.CALIBRATE_OP_TYPE}", version=schema.OPSET_VERSION)
            graph.insert_before(anchor, node)
            L = len(self.spec.threshold_lengths)
            types = {"theta_sums": (ir.DataType.DOUBLE, [site.Hq, L, 3]), "sdc_sums": (ir.DataType.DOUBLE, [site.Hq, L, 2]),
                     "stats": (ir.DataType.INT64, [None, site.Hq, schema.NUM_STATS])}
            for value, name in zip(node.outputs, schema.CALIBRATE_OUTPUTS):
                value.name = f"{prefix}.Y" if name == "Y" else ""  # no KV outputs: nothing reads them
                if name in exposed:
                    value.name = output_name(site.id, name)
                    value.dtype, value.shape = types[name][0], ir.Shape(types[name][1])
                    graph.outputs.append(value)
            y = _add(graph, anchor, "Reshape", [_add(graph, anchor, "Transpose", [node.outputs[0]], f"{prefix}/Y_BSHD",
                                                     perm=_BHSD),
                                                _const(graph, "topt.gqa.shape_BSD", [0, 0, -1])], f"{prefix}/Y_BSD")
            y.dtype, y.shape = site.output.dtype, site.output.shape
            _take_over(graph, site.output, y, position, position[id(anchor)], everywhere=True)
        for opsets in (model.opset_imports, graph.opset_imports):
            opsets[schema.DOMAIN] = schema.OPSET_VERSION
        return ir.passes.PassResult(model, modified=bool(self.sites))
