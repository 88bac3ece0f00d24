"""PyTorch front end: an nn.Module → the same module with TopThetaAttention sites.

Two hooks, one per kind of model, both ending in a `TopThetaSite` submodule (the site's thresholds
as buffers `thresholds` [Hq, L] float32 and `threshold_lengths` [L] int64, its attributes, and
`forward` = `torch_op.top_theta_attention`):

- **Hugging Face models** (LLaMA family, Qwen2, Mistral …, transformers 5.x). Their attention
  modules call `ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, …)` with
  (module, query, key, value, attention_mask, scaling, dropout, …), the K/V *before* repeat_kv.
  That call is the site. `sparsify` registers `topt_sdpa` / `topt_eager` with transformers'
  `AttentionInterface` (and the matching `sdpa_mask` / `eager_mask` with `AttentionMaskInterface`,
  so the masks are those of the original implementation) and switches the model to it with
  `set_attn_implementation`. A module is a site if its `forward` reads `ALL_ATTENTION_FUNCTIONS`;
  ids follow `layer_idx`. Dense sites (softcap, sinks, cross-attention, bfloat16) still go through
  the function and run the original sdpa/eager code.
  *KV cache*: HF's `DynamicCache` concatenates past ⧺ new before attention. A forward pre-hook on
  each matched module hands the module a cache proxy whose `update` returns the new K/V
  unchanged, and the site calls the op with `past_key`/`past_value` = the cache layer's tensors
  and stores the op's `present_key`/`present_value` back into the layer. So the exported node reads
  the graph's `past_key_values.N.*` and its presents are the graph's `present.N.*` — exactly the
  node topt-compile makes from the dense export (which looks through the Concat). Caches other
  than `DynamicLayer` (sliding-window, static) are updated as usual and the op gets the
  concatenated K/V with no past (HF always passes an explicit mask then, so the math is the same).
- **Plain modules and fx GraphModules**: `torch.fx.symbolic_trace` (or the given GraphModule),
  shapes from `ShapeProp` on `example_inputs`, then a pass over the graph: each
  `F.scaled_dot_product_attention` call and each `matmul → [scale] → [+ mask] → [cast] softmax →
  [cast/dropout p=0] → matmul` becomes a `call_module` of a `TopThetaSite`, looking through
  repeat_kv (`x[:, :, None].expand(…).reshape(…)`, `unsqueeze(2)`, `repeat_interleave(G, dim=1)`)
  so K/V are the Hkv heads. Ids in graph (execution) order.

*Export*: under `torch.onnx.export(dynamo=True)` the site emits `ai.topt::TopThetaAttention` through
`torch.onnx.ops.symbolic_multi_out` (torch_op.py); the buffers become initializers. No custom
translation table is needed. Elsewhere it runs `torch.ops.topt.top_theta_attention`.

*Thresholds*: a t.json (`ThresholdTable`) keyed by the same site ids, or a uniform θ. A t.json's
fingerprint is the ONNX graph's (I/O names); a torch module has none, so tables are checked
here site by site (ids, Hq, Hkv, dtype), not by fingerprint.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import operator
import os
import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

from ..compile import CompileOptions, Report, resolve_thresholds
from ..errors import NoSitesError, ToptError
from ..match.site import DENSE, MATCHED, Site
from ..thresholds.schema import SiteThresholds
from .torch_op import top_theta_attention

DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16"}


class TopThetaSite(torch.nn.Module):
    """One site: thresholds as buffers, attributes, and the op. `calibrator` (calibrate_torch.py)
    replaces the op by exact top-k attention while thresholds are being calibrated."""

    def __init__(self, site_id: str, t: SiteThresholds, scale: float | None):
        super().__init__()
        self.site_id, self.scale = site_id, scale
        self.k, self.placement, self.compensation = t.k, t.placement, t.compensation
        self.calibrated_max_length = t.calibrated_max_length
        self.register_buffer("thresholds", torch.tensor(t.thresholds, dtype=torch.float32))
        self.register_buffer("threshold_lengths", torch.tensor(t.threshold_lengths, dtype=torch.int64))
        sdc = None if t.sdc_log_mass is None else torch.tensor(t.sdc_log_mass, dtype=torch.float32)
        self.register_buffer("sdc_log_mass", sdc)
        self.calibrator = None

    def forward(self, query, key, value, attn_mask=None, past_key=None, past_value=None, is_causal: int = 0,
                present: bool = False):
        if self.calibrator is not None:
            return self.calibrator(self, query, key, value, attn_mask, past_key, past_value, is_causal, present)
        return top_theta_attention(
            query, key, value, attn_mask, past_key, past_value, thresholds=self.thresholds,
            threshold_lengths=self.threshold_lengths, sdc_log_mass=self.sdc_log_mass, scale=self.scale,
            is_causal=int(is_causal), k=self.k, placement=self.placement, compensation=self.compensation,
            calibrated_max_length=self.calibrated_max_length, present=present)

    def extra_repr(self) -> str:
        return (f"{self.site_id}: k={self.k}, {self.placement}, {self.compensation}, "
                f"thresholds {list(self.thresholds.shape)}")


# --- public API ---------------------------------------------------------------------------------

def list_sites(model: torch.nn.Module, example_inputs: tuple | None = None) -> Report:
    """The attention sites of `model` (HF model, nn.Module or GraphModule), matched or dense + why."""
    sites, _ = _find(model, example_inputs)
    return Report(type(model).__name__, fingerprint(sites), sites)


def sparsify(model: torch.nn.Module, options: CompileOptions | None = None, *, example_inputs: tuple | None = None,
             **kwargs) -> tuple[torch.nn.Module, Report]:
    """`model` with every matched site running TopThetaAttention, and the report.

    `kwargs` are CompileOptions fields: `sparsify(m, thresholds="t.json")` or `sparsify(m, theta=-inf)`.
    A Hugging Face model is changed in place (and returned); another module is traced into a new
    GraphModule (`example_inputs` are needed for head counts). Raises ToptError subclasses.
    """
    options = dataclasses.replace(options or CompileOptions(), **kwargs)
    sites, wiring = _find(model, example_inputs)
    fp = fingerprint(sites)
    report = Report(type(model).__name__, fp, sites)
    matched = [s for s in sites if s.matched]
    if not matched and not options.allow_no_sites:
        dense = f"; {len(sites)} kept dense, first: {sites[0].id}: {sites[0].reason}" if sites else ""
        raise NoSitesError(f"{type(model).__name__}: no attention site matched{dense}")
    table = resolve_thresholds(options, fp, sites)
    table.check_fits(table.fingerprint, sites)  # a torch module has no ONNX fingerprint: sites are checked
    site_modules = {s.id: TopThetaSite(s.id, table.sites[s.id], s.scale) for s in matched}
    if _is_hf(model):
        _install_hf(model, sites, wiring, site_modules)
        out = model
    else:
        out = _install_fx(wiring.pop("_graph_module"), sites, wiring, site_modules)
    report.thresholds = (os.fspath(options.thresholds) if isinstance(options.thresholds, (str, os.PathLike)) else
                         f"uniform theta={options.theta}" if options.theta is not None else "table")
    return out, report


def restore(model: torch.nn.Module) -> torch.nn.Module:
    """Undoes `sparsify` on a Hugging Face model in place: the original attention implementation,
    no TopThetaSite submodules, no cache hooks. (A GraphModule from `sparsify` is a new module:
    keep the original instead.)"""
    for module in model.modules():
        if hasattr(module, "_topt_hook"):
            module._topt_hook.remove()
            del module._topt_hook
        if isinstance(getattr(module, "topt", None), TopThetaSite):
            del module.topt
    if _is_hf(model) and model.config._attn_implementation.startswith(PREFIX):
        model.set_attn_implementation(model.config._attn_implementation.removeprefix(PREFIX))
    return model


def site_modules(model: torch.nn.Module) -> dict[str, TopThetaSite]:
    """The TopThetaSite submodules of a sparsified model, by site id."""
    return {m.site_id: m for m in model.modules() if isinstance(m, TopThetaSite)}


def fingerprint(sites: list[Site]) -> str:
    """Hash of the sites (id, status, shapes, dtype): what a torch-side t.json depends on."""
    h = hashlib.sha256()
    for s in sites:
        h.update(f"{s.id}:{s.status}:{s.Hq}:{s.Hkv}:{s.Dh}:{s.dtype};".encode())
    return h.hexdigest()[:16]


def _find(model, example_inputs):
    if _is_hf(model):
        return _hf_sites(model)
    gm = model if isinstance(model, fx.GraphModule) else fx.symbolic_trace(model)
    if example_inputs is not None:
        from torch.fx.passes.shape_prop import ShapeProp
        with torch.no_grad():
            ShapeProp(gm).propagate(*example_inputs)
    sites, wiring = _fx_sites(gm)
    wiring["_graph_module"] = gm
    return sites, wiring


def _site(i: int, anchor: str, form: str, reason: str = "", **props) -> Site:
    return Site(f"layer{i}", DENSE if reason else MATCHED, anchor, form, reason=reason, **props)


def _scale_or_default(scale, dh):
    """None (op.md: 1/√Dh) when the scale is that default, as the ONNX front end writes it."""
    if scale is None or (dh and math.isclose(scale, 1 / math.sqrt(dh), rel_tol=1e-6)):
        return None
    return float(scale)


# --- Hugging Face: the AttentionInterface hook ------------------------------------------------

BASES = ("sdpa", "eager")
PREFIX = "topt_"


def _is_hf(model) -> bool:
    config = getattr(model, "config", None)
    return config is not None and hasattr(config, "_attn_implementation") and hasattr(model, "set_attn_implementation")


def _routes_attention(module) -> bool:
    forward = getattr(type(module), "forward", None)
    return forward is not None and "ALL_ATTENTION_FUNCTIONS" in getattr(forward, "__code__", None).co_names


def _hf_sites(model):
    modules = [(name, m) for name, m in model.named_modules() if _routes_attention(m)]
    if all(isinstance(getattr(m, "layer_idx", None), int) for _, m in modules):
        modules.sort(key=lambda nm: nm[1].layer_idx)  # stable: registration order within a layer
    base = model.config._attn_implementation.removeprefix(PREFIX)
    sites, wiring = [], {}
    for i, (name, m) in enumerate(modules):
        config = getattr(m, "config", model.config)
        hq = getattr(config, "num_attention_heads", None)
        hkv = getattr(config, "num_key_value_heads", None) or hq
        dh = getattr(m, "head_dim", None)
        param = next(m.parameters(), None)
        dtype = param.dtype if param is not None else None
        softcap = getattr(config, "attn_logit_softcapping", None) or getattr(m, "attn_logit_softcapping", None)
        reason = ""
        if base not in BASES:
            reason = f"attn_implementation={base}: only {' and '.join(BASES)} are routed to TopThetaAttention"
        elif softcap:
            reason = f"softcap={softcap} is not supported by TopThetaAttention"
        elif getattr(m, "sinks", None) is not None:
            reason = "attention sinks are not supported by TopThetaAttention"
        elif getattr(m, "is_cross_attention", False):
            reason = "cross-attention (encoder keys) is not a causal-LM site"
        elif not (isinstance(hq, int) and isinstance(hkv, int) and isinstance(dh, int)):
            reason = f"head counts unknown (Hq={hq}, Hkv={hkv}, Dh={dh})"
        elif hq % hkv:
            reason = f"Hq={hq} is not a multiple of Hkv={hkv}"
        elif dtype not in DTYPE_NAMES:
            reason = f"dtype {dtype} is not supported (float32, float16)"
        sites.append(_site(i, name, "AttentionInterface", reason, Hq=hq, Hkv=hkv, Dh=dh, Dv=dh,
                           dtype=DTYPE_NAMES.get(dtype), mask="bool" if base == "sdpa" else "float",
                           scale=_scale_or_default(getattr(m, "scaling", None), dh), variant={"base": base}))
        wiring[sites[-1].id] = m
    return sites, wiring


def _install_hf(model, sites, wiring, site_modules):
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask
    base = model.config._attn_implementation.removeprefix(PREFIX)
    if base not in BASES:
        raise ToptError(f"{type(model).__name__}: attn_implementation={base}; load the model with "
                        f"attn_implementation='sdpa' or 'eager' to sparsify it")
    AttentionInterface.register(PREFIX + "sdpa", _hf_attention)
    AttentionInterface.register(PREFIX + "eager", _hf_attention)
    AttentionMaskInterface.register(PREFIX + "sdpa", sdpa_mask)
    AttentionMaskInterface.register(PREFIX + "eager", eager_mask)
    restore(model)  # a second sparsify replaces the first
    for site in sites:
        module = wiring[site.id]
        if site.id in site_modules:
            module.topt = site_modules[site.id]
            module._topt_hook = module.register_forward_pre_hook(_defer_cache_update, with_kwargs=True)
    model.set_attn_implementation(PREFIX + base)
    if model.config._attn_implementation != PREFIX + base:
        raise ToptError(f"{type(model).__name__}: transformers refused attn_implementation={PREFIX + base}")


class _DeferredCache:
    """A cache seen by one attention module: `update` returns the new K/V and leaves the
    concatenation to the site (which passes the cached rows to the op as past_key/past_value)."""

    def __init__(self, cache, module):
        self._cache, self._module = cache, module

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self._module._topt_deferred = (self._cache, layer_idx, args, kwargs)
        return key_states, value_states

    def __getattr__(self, name):
        return getattr(self._cache, name)


def _defer_cache_update(module, args, kwargs):
    cache = kwargs.get("past_key_values")
    if cache is None or not module.config._attn_implementation.startswith(PREFIX):
        return None
    return args, {**kwargs, "past_key_values": _DeferredCache(cache, module)}


def _hf_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' attention-function signature; query [B,Hq,S,Dh], key/value [B,Hkv,T,D]."""
    site = getattr(module, "topt", None)
    deferred = module.__dict__.pop("_topt_deferred", None)
    if site is None:  # a dense site
        if deferred is not None:
            key, value = deferred[0].update(key, value, deferred[1], *deferred[2], **deferred[3])
        return _base_attention(module)(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                       **({} if is_causal is None else {"is_causal": is_causal}), **kwargs)
    if dropout and module.training:
        raise ToptError(f"{site.site_id}: dropout={dropout} in training mode: TopThetaAttention is for inference")
    for name in ("softcap", "s_aux"):
        if kwargs.get(name) is not None:
            raise ToptError(f"{site.site_id}: {name} is not supported by TopThetaAttention")
    expected = site.scale if site.scale is not None else query.shape[-1] ** -0.5
    if scaling is not None and not math.isclose(scaling, expected, rel_tol=1e-6):
        raise ToptError(f"{site.site_id}: scaling={scaling} at run time, {expected} when sparsified")
    past_key = past_value = layer = None
    if deferred is not None:
        from transformers.cache_utils import DynamicLayer
        cache, idx, args, kw = deferred
        layer = cache.layers[idx] if idx < len(getattr(cache, "layers", ())) else None
        if type(layer) is DynamicLayer:
            if layer.is_initialized:
                past_key, past_value = layer.keys, layer.values
            else:
                layer.lazy_initialization(key, value)
        else:  # another cache layer: its own update, and the op sees past ⧺ new as new keys
            layer = None
            key, value = cache.update(key, value, idx, *args, **kw)
    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    causal = int(bool(causal) and attention_mask is None and query.shape[2] > 1)  # as transformers' sdpa
    if layer is not None:
        y, layer.keys, layer.values = site(query, key, value, attention_mask, past_key, past_value,
                                           is_causal=causal, present=True)
    else:
        y = site(query, key, value, attention_mask, is_causal=causal)
    return y.transpose(1, 2).contiguous(), None


def _base_attention(module):
    base = module.config._attn_implementation.removeprefix(PREFIX)
    if base == "sdpa":
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        return sdpa_attention_forward
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        raise ToptError(f"{type(module).__name__}: no eager_attention_forward in {type(module).__module__}")
    return eager


# --- fx: F.scaled_dot_product_attention and matmul/softmax/matmul ------------------------------

_SDPA = (F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention)
_MATMUL = (torch.matmul, operator.matmul, torch.Tensor.matmul)
_SOFTMAX = (torch.softmax, F.softmax, torch.Tensor.softmax)
_CASTS = {"to", "float", "half", "type", "type_as", "contiguous"}


class _NoMatch(Exception):
    """A structural site that cannot be rewritten; the message is the report's reason."""


def _is(node, functions=(), methods=()) -> bool:
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_function":
        return node.target in functions
    return node.op == "call_method" and node.target in methods


def _arg(node, i, name, default=None):
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def _shape(node):
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return (tuple(meta.shape), meta.dtype) if meta is not None and hasattr(meta, "shape") else (None, None)


def _fx_sites(gm: fx.GraphModule):
    sites, wiring = [], {}
    for node in gm.graph.nodes:
        if _is(node, _SDPA):
            form, match = "F.scaled_dot_product_attention", _match_sdpa
        elif _is(node, _MATMUL, {"matmul"}) and _softmax_above(node.args[0]) is not None:
            form, match = "matmul-softmax-matmul", _match_decomposed
        else:
            continue
        try:
            w = match(node)
            props = _props(w)
            reason = ""
        except _NoMatch as e:
            w, props, reason = None, {}, str(e)
        site = _site(len(sites), node.name, form, reason, **props)
        sites.append(site)
        if w is not None:
            wiring[site.id] = w
    return sites, wiring


def _walk(node, through):
    """Up from `node` through nodes for which `through(node)` returns their input, else stop."""
    for _ in range(8):
        nxt = through(node)
        if nxt is None:
            return node
        node = nxt
    return node


def _through_casts_and_dropout(n):
    if _is(n, (), _CASTS):
        return n.args[0]
    if _is(n, (F.dropout, torch.dropout), {"dropout"}):
        p, training = _arg(n, 1, "p", 0.5), _arg(n, 2, "training", True)
        if p == 0 or training is False:
            return n.args[0]
        raise _NoMatch(f"dropout p={p} in training mode between softmax and the V matmul ({n.name})")
    return None


def _softmax_above(value):
    try:
        node = _walk(value, _through_casts_and_dropout)
    except _NoMatch:
        return value  # structurally attention; _match_decomposed reports why it is dense
    return node if _is(node, _SOFTMAX, {"softmax"}) else None


def _unrepeat(node):
    """The Hkv-head K/V under a repeat_kv expansion (GQA), else `node`."""
    if _is(node, (torch.repeat_interleave,), {"repeat_interleave"}) and _arg(node, 2, "dim") == 1:
        return node.args[0]
    if node.op == "call_function" and getattr(node.target, "__name__", "") == "repeat_kv":
        return node.args[0]
    if _is(node, (torch.reshape,), {"reshape", "view"}):
        expand = node.args[0]
        if _is(expand, (), {"expand"}):
            inner = expand.args[0]
            if _is(inner, (torch.unsqueeze,), {"unsqueeze"}) and _arg(inner, 1, "dim") == 2:
                return inner.args[0]
            if _is(inner, (operator.getitem,)) and isinstance(inner.args[1], tuple) and \
                    list(inner.args[1][:3]) == [slice(None), slice(None), None]:
                return inner.args[0]
    return node


def _match_sdpa(node):
    q, k, v = node.args[:3]
    mask = _arg(node, 3, "attn_mask")
    dropout, causal = _arg(node, 4, "dropout_p", 0.0), _arg(node, 5, "is_causal", False)
    scale = _arg(node, 6, "scale")
    if not isinstance(dropout, (int, float)) or dropout != 0:
        raise _NoMatch(f"dropout_p={dropout} is not 0")
    if not isinstance(causal, bool) or (scale is not None and not isinstance(scale, (int, float))):
        raise _NoMatch("is_causal/scale are computed in the graph, not constants")
    return dict(q=q, k=_unrepeat(k), v=_unrepeat(v), mask=mask, scale=scale, is_causal=int(causal), out=node,
                k_repeat=_unrepeat(k) is not k)


def _match_decomposed(node):
    probs = _walk(node.args[0], _through_casts_and_dropout)
    dim = _arg(probs, 1, "dim")
    if dim not in (-1, 3):
        raise _NoMatch(f"softmax over dim {dim}, not the last axis ({probs.name})")
    x, factor, mask = probs.args[0], 1.0, None
    while not _is(x, _MATMUL, {"matmul"}):
        if _is(x, (), _CASTS):
            x = x.args[0]
        elif _is(x, (operator.mul, torch.mul), {"mul"}) and isinstance(x.args[1], (int, float)):
            x, factor = x.args[0], factor * x.args[1]
        elif _is(x, (operator.mul, torch.mul), {"mul"}) and isinstance(x.args[0], (int, float)):
            x, factor = x.args[1], factor * x.args[0]
        elif _is(x, (operator.truediv, torch.div), {"div"}) and isinstance(x.args[1], (int, float)):
            x, factor = x.args[0], factor / x.args[1]
        elif _is(x, (operator.add, torch.add), {"add"}) and mask is None and isinstance(x.args[1], fx.Node):
            x, mask = x.args[0], x.args[1]
        else:
            raise _NoMatch(f"{getattr(x, 'name', x)} between the scores matmul and softmax is not a scale, "
                           f"an additive mask or a cast")
    kt = x.args[1]
    if _is(kt, (torch.transpose,), {"transpose"}) and sorted(a % 4 for a in kt.args[1:3]) == [2, 3]:
        k = kt.args[0]
    elif _is(kt, (torch.permute,), {"permute"}) and list(kt.args[1] if isinstance(kt.args[1], (list, tuple))
                                                         else kt.args[1:]) == [0, 1, 3, 2]:
        k = kt.args[0]
    else:
        raise _NoMatch(f"the key of {x.name} is not transposed by transpose(-2, -1) or permute(0, 1, 3, 2)")
    return dict(q=x.args[0], k=_unrepeat(k), v=_unrepeat(node.args[1]), mask=mask, scale=factor, is_causal=0,
                out=node, k_repeat=_unrepeat(k) is not k)


def _props(w) -> dict[str, Any]:
    (qs, qt), (ks, _), (vs, _), (os_, _) = (_shape(w[n]) for n in ("q", "k", "v", "out"))
    if qs is None or ks is None or vs is None:
        raise _NoMatch("shapes unknown: pass example_inputs so ShapeProp can give the head counts")
    if not len(qs) == len(ks) == len(vs) == 4 or os_ is not None and len(os_) != 4:
        raise _NoMatch(f"rank {len(qs)} attention: expected 4D BHSD query/key/value")
    hq, hkv, dh, dv = qs[1], ks[1], qs[3], vs[3]
    if hq % hkv:
        raise _NoMatch(f"Hq={hq} is not a multiple of Hkv={hkv}")
    if qt not in DTYPE_NAMES:
        raise _NoMatch(f"dtype {qt} is not supported (float32, float16)")
    mask_kind = "none"
    if w["mask"] is not None:
        ms, mt = _shape(w["mask"])
        if ms is None or not 2 <= len(ms) <= 4:
            raise _NoMatch(f"mask of unknown shape {ms}: expected rank 2-4 broadcastable to [B,Hq,S,T]")
        mask_kind = "bool" if mt == torch.bool else "float"
    return dict(Hq=hq, Hkv=hkv, Dh=dh, Dv=dv, dtype=DTYPE_NAMES[qt], mask=mask_kind, is_causal=w["is_causal"],
                scale=_scale_or_default(w["scale"], dh), variant={"k_repeat": w["k_repeat"]})


def _install_fx(gm: fx.GraphModule, sites, wiring, site_modules) -> fx.GraphModule:
    graph = gm.graph
    for site in sites:
        if site.id not in site_modules:
            continue
        w = wiring[site.id]
        name = f"topt_{site.id}"
        gm.add_submodule(name, site_modules[site.id])
        with graph.inserting_before(w["out"]):
            new = graph.call_module(name, (w["q"], w["k"], w["v"], w["mask"]), {"is_causal": w["is_causal"]})
        w["out"].replace_all_uses_with(new)
    graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm
