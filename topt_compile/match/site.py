"""An attention site: where in the graph, what form it has, and the values a rewrite wires up."""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import onnx_ir as ir

MATCHED, DENSE = "matched", "dense"


@dataclasses.dataclass
class Site:
    """One attention computation. `status` is matched (rewritable) or dense (kept, `reason` says why).

    Dimension letters as in docs/op.md. The ir.Value fields are the op's inputs/outputs in the
    original graph: query [B,Hq,S,Dh]; key/value the *new* rows, before any GQA expansion
    ([B,Hkv,Skv,D]; key in BSHD when key_layout says so); past_key/past_value what the graph
    concatenates in front (concat layout); output [B,Hq,S,Dv]; present_key/present_value the
    values that held past ⧺ new.
    """

    id: str
    status: str
    anchor: str                     # name of the node that produces the attention output
    form: str                       # "sdpa" (decomposed MatMul/Softmax/MatMul) | "Attention" (ONNX op)
    reason: str = ""
    variant: dict[str, Any] = dataclasses.field(default_factory=dict)  # which alternatives matched
    Hq: int | None = None
    Hkv: int | None = None
    Dh: int | None = None
    Dv: int | None = None
    dtype: str | None = None
    mask: str = "none"              # none | float | bool
    is_causal: int = 0
    scale: float | None = None      # None: 1/sqrt(Dh)
    kv_cache: bool = False
    nodes: int = 0                  # nodes the match covers
    # wiring (not serialized)
    query: ir.Value | None = dataclasses.field(default=None, repr=False)
    key: ir.Value | None = dataclasses.field(default=None, repr=False)
    value: ir.Value | None = dataclasses.field(default=None, repr=False)
    attn_mask: ir.Value | None = dataclasses.field(default=None, repr=False)
    past_key: ir.Value | None = dataclasses.field(default=None, repr=False)
    past_value: ir.Value | None = dataclasses.field(default=None, repr=False)
    output: ir.Value | None = dataclasses.field(default=None, repr=False)
    present_key: ir.Value | None = dataclasses.field(default=None, repr=False)
    present_value: ir.Value | None = dataclasses.field(default=None, repr=False)
    key_layout: str = "BHSD"

    @property
    def matched(self) -> bool:
        return self.status == MATCHED

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if not isinstance(getattr(self, f.name), ir.Value) and f.name not in _WIRING}
        if self.matched:
            out.pop("reason")
        return out


_WIRING = {"query", "key", "value", "attn_mask", "past_key", "past_value", "output", "present_key",
           "present_value", "key_layout"}


def fingerprint(model: ir.Model, sites: list[Site]) -> str:
    """A short hash of what thresholds depend on: the graph's I/O and each site's id and shape.

    t.json records it, so a table is not applied to another model by mistake; weights and
    unrelated graph changes do not change it.
    """
    h = hashlib.sha256()
    for v in list(model.graph.inputs) + list(model.graph.outputs):
        h.update(f"{v.name}:{v.dtype};".encode())
    for s in sites:
        h.update(f"{s.id}:{s.status}:{s.Hq}:{s.Hkv}:{s.Dh}:{s.dtype};".encode())
    return h.hexdigest()[:16]
