"""Pass: each matched site → one ai.topt::TopThetaAttention node; the dense nodes are left for DCE."""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ..match.site import Site
from ..ops import schema
from ..thresholds.schema import ThresholdTable


class InsertTopThetaAttention(ir.passes.InPlacePass):
    """Wires each site's Q, new K/V, mask and past K/V into a TopThetaAttention node.

    The node's Y takes over the uses of the site's output, its present_key/value those of the
    KV-cache Concat (graph outputs keep their names: `present.N.key` still means past ⧺ new).
    Thresholds become float32 initializers `topt.<site>.thresholds` [Hq, L] and int64
    `topt.<site>.threshold_lengths` [L].
    """

    def __init__(self, sites: list[Site], table: ThresholdTable, stats: bool = False, dense_prompt: bool = False):
        super().__init__()
        self.sites = [s for s in sites if s.matched and s.id in table.sites]
        self.table = table
        self.stats = stats  # also expose each node's stats as a graph output `topt.<site>.stats`
        self.dense_prompt = dense_prompt  # the nodes' dense_prompt attribute (op.md)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        position = {id(node): i for i, node in enumerate(graph)}
        for site in self.sites:
            anchor = site.output.producer()
            node = self._node(graph, site, self.table.sites[site.id], anchor)
            _take_over(graph, site.output, node.outputs[0], position, position[id(anchor)], everywhere=True)
            if site.present_key is not None:
                everywhere = site.form == "Attention" and site.present_key.producer() is anchor
                _take_over(graph, site.present_key, node.outputs[1], position, position[id(anchor)], everywhere)
                _take_over(graph, site.present_value, node.outputs[2], position, position[id(anchor)], everywhere)
        for opsets in (model.opset_imports, graph.opset_imports):
            opsets[schema.DOMAIN] = schema.OPSET_VERSION
        return ir.passes.PassResult(model, modified=bool(self.sites))

    def _node(self, graph: ir.Graph, site: Site, t, anchor: ir.Node) -> ir.Node:
        prefix = f"topt.{site.id}"
        key = site.key
        if site.key_layout == "BSHD":  # the op takes BHSD keys
            transpose = ir.node("Transpose", [key], {"perm": [0, 2, 1, 3]}, name=f"{prefix}/key_BHSD")
            graph.insert_before(anchor, transpose)
            key = transpose.outputs[0]
        inputs = {
            "Q": site.query, "K": key, "V": site.value, "attn_mask": site.attn_mask,
            "past_key": site.past_key, "past_value": site.past_value,
            "thresholds": _initializer(graph, f"{prefix}.thresholds", np.asarray(t.thresholds, np.float32)),
            "threshold_lengths": _initializer(graph, f"{prefix}.threshold_lengths", np.asarray(t.threshold_lengths, np.int64)),
        }
        if t.sdc_log_mass is not None:
            inputs["sdc_log_mass"] = _initializer(graph, f"{prefix}.sdc_log_mass", np.asarray(t.sdc_log_mass, np.float32))
        attrs = schema.Attributes(scale=site.scale, is_causal=site.is_causal, k=t.k, placement=t.placement,
                                  compensation=t.compensation, kv_layout="concat",
                                  calibrated_max_length=t.calibrated_max_length,
                                  dense_prompt=int(self.dense_prompt)).validate()
        values = [inputs.get(name) for name in schema.INPUTS]
        while values[-1] is None:
            values.pop()
        n_out = len(schema.OUTPUTS) if self.stats else (3 if site.present_key is not None else 1)
        node = ir.Node(schema.DOMAIN, schema.OP_TYPE, values, ir.convenience.convert_attributes(attrs.onnx_attributes()),
                       num_outputs=n_out, name=f"{prefix}/{schema.OP_TYPE}", version=schema.OPSET_VERSION)
        for new, old, name in zip(node.outputs, (site.output, site.present_key, site.present_value), schema.OUTPUTS):
            if old is not None:
                new.name, new.dtype, new.shape = f"{prefix}.{name}", old.dtype, old.shape
        if self.stats:
            stats = node.outputs[schema.OUTPUTS.index("stats")]
            stats.name, stats.dtype = f"{prefix}.stats", ir.DataType.INT64
            stats.shape = ir.Shape([site.query.shape[0] if site.query.shape else None, site.Hq, schema.NUM_STATS])
            graph.outputs.append(stats)
        graph.insert_before(anchor, node)
        return node


def _take_over(graph: ir.Graph, old: ir.Value, new: ir.Value, position: dict, anchor_pos: int, everywhere: bool):
    """Points uses of `old` at `new`: graph outputs (keeping the name) and uses after the anchor.

    Uses before the anchor (e.g. Shape(present) feeding a GQA Expand) keep the old value: they
    die with the dense nodes, or keep their Concat alive if something else still needs it.
    """
    for i, out in enumerate(graph.outputs):
        if out is old:
            name, old.name = old.name, f"{old.name}.dense"
            new.name = name
            graph.outputs[i] = new
    for use in list(old.uses()):
        if everywhere or position.get(id(use.node), anchor_pos + 1) > anchor_pos:
            use.node.replace_input_with(use.idx, new)


def _initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                     const_value=ir.tensor(array, name=name))
    graph.register_initializer(value)
    return value
