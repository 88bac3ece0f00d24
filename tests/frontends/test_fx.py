"""The torch front end (frontends/fx.py, torch_op.py): the op in torch equals the numpy reference,
sparsified models equal the originals at θ = −inf, exports carry the same TopThetaAttention nodes
as topt-compile's rewrite of the dense export, and they run in onnxruntime like the torch module."""
import itertools
import math
import zlib

import numpy as np
import onnx_ir as ir
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import torch.nn.functional as F  # noqa: E402

from models import (LAYERS, ExportSpec, _export_model, _wrapper, assert_outputs_close, build_model,  # noqa: E402
                    export, io_names, make_feeds, run_ort, tiny_config)
from topt_compile.compile import compile_model, list_sites  # noqa: E402
from topt_compile.frontends import fx as tfx  # noqa: E402
from topt_compile.frontends.torch_op import attention_stats, top_k_calibrate, top_theta_attention  # noqa: E402
from topt_compile.ops.calibrate_reference import top_theta_calibrate  # noqa: E402
from topt_compile.ops.reference import top_theta_attention as reference  # noqa: E402
from topt_compile.thresholds.calibrate_torch import calibrate  # noqa: E402
from topt_compile.thresholds.schema import ThresholdTable  # noqa: E402

MINUS_INF = -math.inf


# --- the op in torch vs the numpy reference ---------------------------------------------------

def _op_cases():
    variants = [("post_softmax", "vmc"), ("post_softmax", "none"), ("pre_softmax", "none"),
                ("pre_softmax", "sdc_exact+vmc"), ("pre_softmax", "sdc_exp_threshold"),
                ("pre_softmax", "sdc_calibrated+vmc")]
    return list(itertools.product(variants, [0, 1], ["none", "bool", "float"], [0, 3]))


def _t(x):
    return None if x is None else torch.from_numpy(np.asarray(x))


def _random_call(rng, placement, mask_kind, past, B=2, Hq=4, Hkv=2, S=5, D=8):
    q = (rng.standard_normal((B, Hq, S, D)) * 2).astype(np.float32)
    k, v = (rng.standard_normal((B, Hkv, S, D)).astype(np.float32) for _ in range(2))
    pk, pv = ((rng.standard_normal((B, Hkv, past, D)).astype(np.float32) for _ in range(2)) if past else (None, None))
    T = S + past
    mask = None
    if mask_kind == "bool":
        mask = rng.random((B, 1, S, T)) > 0.3
        mask[0, 0, 1] = False  # a fully masked row
    elif mask_kind == "float":
        mask = np.where(rng.random((B, 1, S, T)) > 0.3, rng.standard_normal((B, 1, S, T)),
                        np.finfo(np.float32).min).astype(np.float32)
    lo, hi = (0.02, 0.3) if placement == "post_softmax" else (-1.0, 1.5)
    thresholds = rng.uniform(lo, hi, (Hq, 3)).astype(np.float32)
    return q, k, v, mask, pk, pv, thresholds, np.array([0, 3, 6], np.int64), rng.uniform(-1, 1, (Hq, 3)).astype(np.float32)


@pytest.mark.parametrize("variant, causal, mask_kind, past", _op_cases())
def test_torch_op_equals_the_numpy_reference(variant, causal, mask_kind, past):
    placement, compensation = variant
    rng = np.random.default_rng(zlib.crc32(str((variant, causal, mask_kind, past)).encode()))
    q, k, v, mask, pk, pv, thr, lengths, sdc = _random_call(rng, placement, mask_kind, past)
    sdc = sdc if "calibrated" in compensation else None
    attrs = dict(is_causal=causal, k=1, placement=placement, compensation=compensation)
    (Y, PK, PV, _, stats), margin = reference(q, k, v, mask, pk, pv, thr, lengths, None, None, sdc,
                                              return_decision_margin=True, **attrs)
    if margin < 1e-4:
        pytest.skip("a score within 1e-4 of θ: float32 and float64 may decide differently")
    y, tpk, tpv = top_theta_attention(_t(q), _t(k), _t(v), _t(mask), _t(pk), _t(pv), thresholds=_t(thr),
                                      threshold_lengths=_t(lengths), sdc_log_mass=_t(sdc), present=True, **attrs)
    np.testing.assert_allclose(y.numpy(), Y, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(tpk.numpy(), PK)
    np.testing.assert_array_equal(tpv.numpy(), PV)
    if sdc is None:
        got = attention_stats(_t(q), _t(k), _t(v), _t(mask), _t(pk), _t(pv), thresholds=_t(thr),
                              threshold_lengths=_t(lengths), **attrs)
        np.testing.assert_array_equal(got.numpy(), stats)


@pytest.mark.parametrize("variant, causal, mask_kind, past", _op_cases()[::3])
def test_torch_top_k_calibration_equals_the_calibrate_reference(variant, causal, mask_kind, past):
    placement, compensation = variant
    rng = np.random.default_rng(7)
    q, k, v, mask, pk, pv, _, lengths, _ = _random_call(rng, placement, mask_kind, past)
    attrs = dict(is_causal=causal, k=2, placement=placement, compensation=compensation)
    (Y, _, _, theta_sums, sdc_sums, _), margin = top_theta_calibrate(q, k, v, mask, pk, pv, lengths,
                                                                     return_decision_margin=True, **attrs)
    assert margin > 1e-5
    y, _, _, ts, ss = top_k_calibrate(_t(q), _t(k), _t(v), _t(mask), _t(pk), _t(pv), threshold_lengths=_t(lengths),
                                      **attrs)
    np.testing.assert_allclose(y.numpy(), Y, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ts.numpy(), theta_sums, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(ss.numpy(), sdc_sums, rtol=1e-5, atol=1e-6)


# --- Hugging Face models: the AttentionInterface hook -----------------------------------------

def _torch_inputs(spec, feeds):
    names, _ = io_names(spec)
    args = [torch.from_numpy(feeds[n]) for n in names[:3]]
    past = tuple(torch.from_numpy(feeds[n]) for n in names[3:])
    return (*args, past) if spec.kv_cache else tuple(args)


def _run_torch(model, spec, feeds) -> dict:
    """The export wrapper's outputs, named as the ONNX file's."""
    with torch.no_grad():
        out = _wrapper(model, spec.kv_cache)(*_torch_inputs(spec, feeds))
    out = out if spec.kv_cache else (out,)
    return {name: t.numpy() for name, t in zip(io_names(spec)[1], out)}


HF_SPECS = [ExportSpec("llama", "dynamo", None, "sdpa", True), ExportSpec("llama", "dynamo", None, "eager", False),
            ExportSpec("qwen2", "dynamo", None, "sdpa", True), ExportSpec("qwen2", "dynamo", None, "eager", True)]


@pytest.mark.parametrize("spec", HF_SPECS, ids=str)
def test_hf_model_sparsified_at_theta_minus_inf_equals_the_original(spec):
    model = build_model(spec)
    feeds = make_feeds(spec)
    dense = _run_torch(model, spec, feeds)
    sparse, report = tfx.sparsify(model, theta=MINUS_INF)
    assert [s.id for s in report.matched] == [f"layer{i}" for i in range(LAYERS)]
    assert {(s.Hq, s.Hkv, s.Dh) for s in report.sites} == {(4, 2, 16)}
    assert len(tfx.site_modules(sparse)) == LAYERS
    assert_outputs_close(feeds, dense, _run_torch(sparse, spec, feeds), rtol=1e-5, atol=1e-5)
    tfx.restore(sparse)
    assert sparse.config._attn_implementation == spec.attn and not tfx.site_modules(sparse)


def test_hf_softcap_sites_stay_dense_with_the_reason_and_the_model_still_runs():
    import transformers as tf
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(tiny_config("gemma2"), attn_implementation="eager").eval()
    report = tfx.list_sites(model)
    assert len(report.sites) == LAYERS and not report.matched
    assert all("softcap" in s.reason for s in report.sites), report.to_text()
    with pytest.raises(Exception, match="no attention site matched"):
        tfx.sparsify(model, theta=MINUS_INF)
    spec = ExportSpec("gemma2", "dynamo", None, "eager", False)
    feeds = make_feeds(spec)
    dense = _run_torch(model, spec, feeds)
    sparse, _ = tfx.sparsify(model, theta=MINUS_INF, allow_no_sites=True)
    assert_outputs_close(feeds, dense, _run_torch(sparse, spec, feeds), rtol=1e-5, atol=1e-5)


def test_thresholds_that_do_not_fit_the_sites_are_refused_naming_the_field():
    model = build_model(HF_SPECS[0])
    fp = tfx.list_sites(model).fingerprint
    table = ThresholdTable.uniform(fp, tfx.list_sites(model).sites, 0.1)
    table.sites["layer1"].Hkv, table.sites["layer1"].Hq = 1, 2
    table.sites["layer1"].thresholds = [[0.1], [0.1]]
    with pytest.raises(Exception, match="sites.layer1.Hq"):
        tfx.sparsify(model, thresholds=table)


# --- plain modules: the fx pass ----------------------------------------------------------------

def _repeat_kv(x, n):
    b, h, s, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n, s, d).reshape(b, h * n, s, d)


class _Attention(torch.nn.Module):
    """Hq=4, Hkv=2 attention in one of the forms users write."""

    def __init__(self, form, hq=4, hkv=2, d=8):
        super().__init__()
        self.form, self.hq, self.hkv, self.d = form, hq, hkv, d
        self.q, self.k, self.v = (torch.nn.Linear(32, h * d) for h in (hq, hkv, hkv))
        self.o = torch.nn.Linear(hq * d, 32)

    def forward(self, x, mask):
        B, S, _ = x.shape
        q = self.q(x).view(B, S, self.hq, self.d).transpose(1, 2)
        k = self.k(x).view(B, S, self.hkv, self.d).transpose(1, 2)
        v = self.v(x).view(B, S, self.hkv, self.d).transpose(1, 2)
        if self.form == "sdpa_gqa":
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        elif self.form == "sdpa_causal_repeat_kv":
            y = F.scaled_dot_product_attention(q, _repeat_kv(k, 2), _repeat_kv(v, 2), is_causal=True)
        else:  # eager: matmul, scale, float mask, fp32 softmax, matmul
            scores = torch.matmul(q, _repeat_kv(k, 2).transpose(2, 3)) * self.d ** -0.5 + mask
            probs = F.softmax(scores, dim=-1 if self.form == "eager" else 1, dtype=torch.float32).to(q.dtype)
            y = torch.matmul(probs, _repeat_kv(v, 2))
        return self.o(y.transpose(1, 2).reshape(B, S, -1))


class _Net(torch.nn.Module):
    def __init__(self, forms):
        super().__init__()
        self.layers = torch.nn.ModuleList(_Attention(f) for f in forms)

    def forward(self, x, bool_mask, float_mask):
        for layer in self.layers:
            x = layer(x, bool_mask if layer.form == "sdpa_gqa" else float_mask)
        return x


def _net_inputs():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 32) * 3
    bool_mask = torch.rand(2, 1, 5, 5) > 0.3
    bool_mask[..., 0] = True
    return x, bool_mask, torch.where(bool_mask, 0.0, torch.finfo(torch.float32).min)


def test_fx_pass_matches_sdpa_and_matmul_softmax_matmul_and_reports_the_rest():
    torch.manual_seed(0)
    net = _Net(["sdpa_gqa", "sdpa_causal_repeat_kv", "eager", "softmax_dim1"]).eval()
    inputs = _net_inputs()
    report = tfx.list_sites(net, inputs)
    assert [(s.id, s.status, s.form) for s in report.sites] == [
        ("layer0", "matched", "F.scaled_dot_product_attention"), ("layer1", "matched", "F.scaled_dot_product_attention"),
        ("layer2", "matched", "matmul-softmax-matmul"), ("layer3", "dense", "matmul-softmax-matmul")]
    assert "softmax over dim 1" in report.sites[3].reason
    assert [(s.Hq, s.Hkv, s.is_causal, s.mask) for s in report.matched] == [(4, 2, 0, "bool"), (4, 2, 1, "none"),
                                                                            (4, 2, 0, "float")]
    assert [s.variant["k_repeat"] for s in report.matched] == [False, True, True]
    assert tfx.list_sites(net).sites[0].reason.startswith("shapes unknown")


def test_fx_module_at_theta_minus_inf_equals_the_original_and_exports_the_op(tmp_path, topt_library):
    torch.manual_seed(0)
    net = _Net(["sdpa_gqa", "sdpa_causal_repeat_kv", "eager"]).eval()
    inputs = _net_inputs()
    gm, report = tfx.sparsify(net, theta=MINUS_INF, example_inputs=inputs)
    with torch.no_grad():
        want, got = net(*inputs), gm(*inputs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # a real θ: the export runs in onnxruntime like the GraphModule
    table = ThresholdTable.uniform(report.fingerprint, report.sites, 0.15, k=1)
    gm, _ = tfx.sparsify(net, thresholds=table, example_inputs=inputs)
    with torch.no_grad():
        got = gm(*inputs)
    assert (got - want).abs().max() > 1e-3  # θ = 0.15 drops keys
    path = tmp_path / "fx.onnx"
    torch.onnx.export(gm, inputs, dynamo=True, input_names=["x", "bool_mask", "float_mask"]).save(str(path))
    nodes = [n for n in ir.load(path).graph if n.op_type == "TopThetaAttention"]
    assert len(nodes) == 3 and [n.attributes["is_causal"].value for n in nodes] == [0, 1, 0]
    ort = run_ort(path, {"x": inputs[0].numpy(), "bool_mask": inputs[1].numpy(), "float_mask": inputs[2].numpy()},
                  topt_library)
    np.testing.assert_allclose(next(iter(ort.values())), got.numpy(), rtol=1e-4, atol=1e-4)


# --- export: the same nodes as topt-compile, the same numbers as torch ------------------------

def _calibration_batches(model, spec, feeds):
    from transformers import DynamicCache
    batch = dict(input_ids=torch.from_numpy(feeds["input_ids"]), attention_mask=torch.from_numpy(feeds["attention_mask"]),
                 position_ids=torch.from_numpy(feeds["position_ids"]), use_cache=spec.kv_cache)
    if spec.kv_cache:
        cache = DynamicCache(config=model.config)
        for i in range(LAYERS):
            cache.update(torch.from_numpy(feeds[f"past_key_values.{i}.key"]),
                         torch.from_numpy(feeds[f"past_key_values.{i}.value"]), i)
        batch["past_key_values"] = cache
    return [batch]


def _topt_nodes(path):
    """Each TopThetaAttention node as comparable data: attributes, which inputs, their graph names
    where they are graph I/O, threshold values, mask dtype, outputs."""
    model = ir.load(path)
    graph_io = {v.name for v in list(model.graph.inputs) + list(model.graph.outputs)}
    nodes = []
    for node in model.graph:
        if node.op_type != "TopThetaAttention":
            continue
        inputs = list(node.inputs)
        nodes.append({
            "domain": node.domain, "attributes": {k: a.value for k, a in node.attributes.items()},
            "inputs": [v is not None for v in inputs],
            "graph_io": [v.name if v is not None and v.name in graph_io else None for v in inputs]
                        + [v.name if v.name in graph_io else None for v in node.outputs],
            "mask_dtype": inputs[3].dtype if len(inputs) > 3 and inputs[3] is not None else None,
            "thresholds": inputs[6].const_value.numpy().tolist(), "threshold_dtype": inputs[6].dtype,
            "threshold_lengths": inputs[7].const_value.numpy().tolist(), "lengths_dtype": inputs[7].dtype,
            "outputs": len(node.outputs)})
    return nodes


EXPORT_SPECS = [ExportSpec("llama", "dynamo", None, "sdpa", True), ExportSpec("llama", "dynamo", None, "eager", True),
                ExportSpec("qwen2", "dynamo", None, "sdpa", True)]


@pytest.mark.parametrize("spec", EXPORT_SPECS, ids=str)
def test_export_of_the_sparsified_model_has_topt_compiles_nodes_and_runs_like_torch(spec, tmp_path, topt_library):
    dense_path = export(spec)
    model = build_model(spec)
    feeds = make_feeds(spec)
    # one t.json, calibrated in torch, stamped with the dense export's fingerprint, applied both ways
    fp = list_sites(dense_path).fingerprint
    table = calibrate(model, _calibration_batches(model, spec, feeds), k=2, first_layers_k=3, length_step=4,
                      fingerprint=fp)
    table.save(tmp_path / "t.json")
    compiled = tmp_path / "compiled.onnx"
    compile_model(dense_path, compiled, thresholds=tmp_path / "t.json")
    sparse, _ = tfx.sparsify(model, thresholds=tmp_path / "t.json")
    exported = _export_model(sparse, spec, tmp_path / "fx.onnx")

    ours, theirs = _topt_nodes(exported), _topt_nodes(compiled)
    # the one difference: transformers' sdpa mask is bool; torchlib's SDPA turns it into a float
    # 0/-inf mask in the dense export, which topt-compile wires up (same visibility, op.md)
    assert [n.pop("mask_dtype") for n in ours] == [ir.DataType.BOOL if spec.attn == "sdpa" else ir.DataType.FLOAT] * LAYERS
    assert [n.pop("mask_dtype") for n in theirs] == [ir.DataType.FLOAT] * LAYERS
    assert len(ours) == LAYERS and ours == theirs
    assert ours[0]["graph_io"][4:6] == ["past_key_values.0.key", "past_key_values.0.value"]
    assert ours[0]["thresholds"] == np.asarray(table.sites["layer0"].thresholds, np.float32).tolist()

    want = _run_torch(sparse, spec, feeds)
    assert_outputs_close(feeds, want, run_ort(exported, feeds, topt_library), rtol=1e-4, atol=1e-4)
    assert_outputs_close(feeds, want, run_ort(compiled, feeds, topt_library), rtol=1e-4, atol=1e-4)


def test_greedy_generation_with_a_dynamic_cache_is_unchanged_at_theta_minus_inf():
    """generate(): prefill into an empty DynamicCache, then decode steps with S = 1 and a past."""
    spec = ExportSpec("qwen2", "dynamo", None, "sdpa", False)
    model = build_model(spec)
    ids = torch.from_numpy(make_feeds(spec)["input_ids"])
    mask = torch.from_numpy(make_feeds(spec)["attention_mask"])
    kwargs = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want = model.generate(ids, **kwargs)
        sparse, _ = tfx.sparsify(model, theta=MINUS_INF)
        got = sparse.generate(ids, **kwargs)
    assert torch.equal(got, want)
