"""Pass: each matched site → one ai.topt::TopThetaCalibrate node (exact top-k attention, TAC).

Two uses (docs/op.md, last section):
- calibration (`sums=True`): every node also outputs `theta_sums` [Hq, L, 3] and `sdc_sums`
  [Hq, L, 2], exposed as graph outputs `topt.<site>.theta_sums` / `topt.<site>.sdc_sums`;
- exact top-k at inference (`sums=False`): the baseline Top-θ is compared with at equal k.
With `stats=True` the node's `stats` [B, Hq, 6] is a graph output `topt.<site>.stats`.
The wiring (Q, new K/V, mask, past; Y and present take over the dense values) is
InsertTopThetaAttention's.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from ..match.site import Site
from ..ops import schema
from .insert_top_theta import _initializer, _take_over


@dataclasses.dataclass
class CalibrateSpec:
    """What each TopThetaCalibrate node computes. `k` maps site id → k (sites not in it stay dense)."""

    k: dict[str, int]
    threshold_lengths: list[int]            # the column grid, shared by every site
    placement: str = "post_softmax"
    compensation: str = "vmc"
    sums: bool = True                       # theta_sums / sdc_sums as graph outputs
    stats: bool = False                     # stats as graph outputs


def output_name(site_id: str, output: str) -> str:
    """The graph output holding `output` (theta_sums, sdc_sums, stats) of site `site_id`."""
    return f"topt.{site_id}.{output}"


class InsertTopThetaCalibrate(ir.passes.InPlacePass):
    def __init__(self, sites: list[Site], spec: CalibrateSpec):
        super().__init__()
        self.sites = [s for s in sites if s.matched and s.id in spec.k]
        self.spec = spec

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        position = {id(node): i for i, node in enumerate(graph)}
        lengths = _initializer(graph, "topt.calibrate.threshold_lengths",
                               np.asarray(self.spec.threshold_lengths, np.int64)) if self.sites else None
        for site in self.sites:
            anchor = site.output.producer()
            node = self._node(graph, site, lengths, anchor)
            _take_over(graph, site.output, node.outputs[0], position, position[id(anchor)], everywhere=True)
            if site.present_key is not None:
                everywhere = site.form == "Attention" and site.present_key.producer() is anchor
                _take_over(graph, site.present_key, node.outputs[1], position, position[id(anchor)], everywhere)
                _take_over(graph, site.present_value, node.outputs[2], position, position[id(anchor)], everywhere)
            for i, name in enumerate(schema.CALIBRATE_OUTPUTS[3:], start=3):
                if self._exposed(name):
                    graph.outputs.append(node.outputs[i])
        for opsets in (model.opset_imports, graph.opset_imports):
            opsets[schema.DOMAIN] = schema.OPSET_VERSION
        return ir.passes.PassResult(model, modified=bool(self.sites))

    def _exposed(self, name: str) -> bool:
        return self.spec.stats if name == "stats" else self.spec.sums

    def _node(self, graph: ir.Graph, site: Site, lengths: ir.Value, anchor: ir.Node) -> ir.Node:
        prefix = f"topt.{site.id}"
        key = site.key
        if site.key_layout == "BSHD":  # the op takes BHSD keys
            transpose = ir.node("Transpose", [key], {"perm": [0, 2, 1, 3]}, name=f"{prefix}/key_BHSD")
            graph.insert_before(anchor, transpose)
            key = transpose.outputs[0]
        inputs = {"Q": site.query, "K": key, "V": site.value, "attn_mask": site.attn_mask,
                  "past_key": site.past_key, "past_value": site.past_value, "threshold_lengths": lengths}
        attrs = schema.Attributes(scale=site.scale, is_causal=site.is_causal, k=self.spec.k[site.id],
                                  placement=self.spec.placement, compensation=self.spec.compensation).validate()
        attrs = {n: v for n, v in attrs.onnx_attributes().items() if n in schema.CALIBRATE_ATTRIBUTES}
        wanted = [i for i, name in enumerate(schema.CALIBRATE_OUTPUTS)
                  if i == 0 or (i < 3 and site.present_key is not None) or (i >= 3 and self._exposed(name))]
        node = ir.Node(schema.DOMAIN, schema.CALIBRATE_OP_TYPE, [inputs.get(n) for n in schema.CALIBRATE_INPUTS],
                       ir.convenience.convert_attributes(attrs), num_outputs=wanted[-1] + 1,
                       name=f"{prefix}/{schema.CALIBRATE_OP_TYPE}", version=schema.OPSET_VERSION)
        shapes = {"theta_sums": (ir.DataType.DOUBLE, [site.Hq, len(self.spec.threshold_lengths), 3]),
                  "sdc_sums": (ir.DataType.DOUBLE, [site.Hq, len(self.spec.threshold_lengths), 2]),
                  "stats": (ir.DataType.INT64, [None, site.Hq, schema.NUM_STATS])}
        olds = (site.output, site.present_key, site.present_value)
        for i, (new, name) in enumerate(zip(node.outputs, schema.CALIBRATE_OUTPUTS)):
            if i < 3:
                if olds[i] is None:
                    new.name = ""  # unused optional output (no KV cache)
                    continue
                new.name, new.dtype, new.shape = f"{prefix}.{name}", olds[i].dtype, olds[i].shape
            elif self._exposed(name):
                dtype, shape = shapes[name]
                new.name, new.dtype, new.shape = output_name(site.id, name), dtype, ir.Shape(shape)
            else:
                new.name = ""
        graph.insert_before(anchor, node)
        return node
