"""The rewrite passes: sites + thresholds → TopThetaAttention nodes, then dead-node removal."""
from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass, RemoveUnusedOpsetsPass

from ..match.site import Site
from ..thresholds.schema import ThresholdTable
from .insert_gqa import InsertTopThetaGQA, is_gqa
from .insert_top_theta import InsertTopThetaAttention


def rewrite(model: ir.Model, sites: list[Site], table: ThresholdTable, stats: bool = False,
            dense_prompt: bool = False) -> ir.passes.PassResult:
    """Rewrites `model` in place: one TopThetaAttention (TopThetaGroupQueryAttention for a GQA node)
    per matched site in `table` (with `stats`, each node's statistics become graph outputs
    `topt.<site>.stats`; with `dense_prompt`, calls with more than one query row stay exact)."""
    return ir.passes.Sequential(
        InsertTopThetaAttention([s for s in sites if not is_gqa(s)], table, stats, dense_prompt),
        InsertTopThetaGQA(sites, table, stats, dense_prompt),
        RemoveUnusedNodesPass(),
        RemoveUnusedOpsetsPass(),
    )(model)


__all__ = ["rewrite", "InsertTopThetaAttention", "InsertTopThetaGQA"]
