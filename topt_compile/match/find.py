"""Find every attention site of a graph: matched ones and, with a reason, those kept dense."""
from __future__ import annotations

import onnx_ir as ir

from .gqa import GroupQueryAttentionRule
from .patterns import DecomposedAttention, OnnxAttention
from .site import DENSE, MATCHED, Site

# Where each rule's match is rooted: the node that produces the attention output.
_RULES = {("", "MatMul"): DecomposedAttention(), ("", "Attention"): OnnxAttention(),
          ("com.microsoft", "GroupQueryAttention"): GroupQueryAttentionRule()}
# Fused attention ops of other runtimes: sites, but not ours to rewrite (yet).
_FOREIGN = {("com.microsoft", "MultiHeadAttention"),
            ("com.microsoft", "Attention"), ("com.microsoft", "SparseAttention"),
            ("com.microsoft", "PackedMultiHeadAttention")}
_HOPS = 6  # how far the site detector walks between Softmax and its MatMuls


def find_sites(model: ir.Model) -> list[Site]:
    """Sites in topological order, ids layer0, layer1, …; nothing in the model is changed."""
    graph = model.graph
    sites: list[Site] = []
    covered: set[int] = set()  # Softmax nodes inside a recognised site
    for node in graph:
        key = (node.domain or "", node.op_type)
        rule = _RULES.get(key)
        if rule is not None:
            match = rule.match(model, graph, node, check_nodes_are_removable=False)
            if match:
                sites.append(_site(node, MATCHED, rule.props, len(match.nodes)))
                covered.update(id(n) for n in match.nodes if n.op_type == "Softmax")
                continue
            if key != ("", "MatMul"):  # a fused attention op: always a site
                sites.append(Site("", DENSE, node.name or "", node.op_type, reason=_reason(rule)))
                continue
            softmax = _attention_softmax(node)
            if softmax is not None and id(softmax) not in covered:
                covered.add(id(softmax))
                sites.append(Site("", DENSE, node.name or "", "sdpa", reason=_reason(rule)))
        elif key in _FOREIGN:
            sites.append(Site("", DENSE, node.name or "", node.op_type,
                              reason=f"{node.domain}::{node.op_type} is not rewritten (only ONNX Attention, GroupQueryAttention and decomposed attention are)"))
    for i, site in enumerate(sites):
        site.id = f"layer{i}"
    return sites


def _site(node: ir.Node, status: str, props: dict, n_nodes: int) -> Site:
    props = dict(props)
    return Site("", status, node.name or "", props.pop("form"), nodes=n_nodes, **props)


def _reason(rule) -> str:
    reason = rule.reason or "no known attention form"
    return reason.splitlines()[0]


def _attention_softmax(matmul: ir.Node) -> ir.Node | None:
    """The Softmax of `MatMul(softmax(MatMul(q, k)…)…, v)`, if `matmul` looks like attention's second MatMul.

    Looks like: a Softmax within a few elementwise hops above input 0, whose own input comes from a
    MatMul of two computed (non-constant) tensors, and a computed `v`. Sites found this way but not
    matched by a rule are reported dense with the rule's reason.
    """
    if len(matmul.inputs) != 2 or any(v is None or v.const_value is not None for v in matmul.inputs):
        return None
    softmax = _walk_up(matmul.inputs[0], {"Cast", "Where", "Dropout", "IsNaN"}, "Softmax")
    if softmax is None:
        return None
    scores = _walk_up(softmax.inputs[0], {"Cast", "Add", "Mul", "Div", "Where", "Tanh", "Sub"}, "MatMul")
    if scores is None or any(v is None or v.const_value is not None for v in scores.inputs):
        return None
    return softmax


def _walk_up(value: ir.Value | None, through: set[str], target: str) -> ir.Node | None:
    for _ in range(_HOPS):
        node = value.producer() if value is not None else None
        if node is None:
            return None
        if node.op_type == target:
            return node
        if node.op_type not in through:
            return None
        value = node.inputs[0] if node.op_type != "Where" else node.inputs[-1]
        if node.op_type == "Where" and node.inputs[0] is not None and node.inputs[0].producer() is not None \
                and node.inputs[0].producer().op_type != "IsNaN":
            value = node.inputs[1]  # Where(mask, scores, fill)
    return None
