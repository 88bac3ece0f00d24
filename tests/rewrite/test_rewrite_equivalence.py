"""Rewrite: the compiled zoo equals the original at θ = -inf, and the numpy reference at finite θ."""
import numpy as np
import onnx
import pytest

from models import LAYERS, ZOO, assert_outputs_close, export, make_feeds, run_ort, run_reference, tolerance
from topt_compile.compile import compile_model
from topt_compile.match import find_sites
from topt_compile.frontends import onnx as frontend
from topt_compile.ops.reference import top_theta_attention

THETA = 0.05  # post-softmax: drops keys with p <= 5 % (rows here have 6-10 keys)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """(spec, theta) → (original path, compiled path), compiled once per module."""
    cache = {}

    def get(spec, theta):
        if (spec, theta) not in cache:
            src = export(spec)
            out = tmp_path_factory.mktemp("compiled") / "sparse.onnx"
            report = compile_model(src, out, theta=theta)
            assert len(report.matched) == LAYERS
            cache[spec, theta] = (src, out)
        return cache[spec, theta]

    return get


@pytest.mark.parametrize("spec", ZOO, ids=str)
def test_compiled_model_with_theta_minus_inf_equals_original_in_the_reference_evaluator(spec, compiled):
    src, out = compiled(spec, float("-inf"))
    model = onnx.load(out)
    assert sum(n.op_type == "TopThetaAttention" for n in model.graph.node) == LAYERS
    assert not any(n.op_type == "Softmax" for n in model.graph.node)  # the dense nodes are gone
    assert [o.name for o in model.graph.output] == [o.name for o in onnx.load(src).graph.output]
    feeds = make_feeds(spec)
    assert_outputs_close(feeds, run_ort(src, feeds), run_reference(out, feeds), **tolerance(spec))


@pytest.mark.parametrize("spec", ZOO, ids=str)
def test_compiled_model_with_theta_minus_inf_equals_original_in_onnxruntime(spec, compiled, topt_library):
    src, out = compiled(spec, float("-inf"))
    feeds = make_feeds(spec)
    assert_outputs_close(feeds, run_ort(src, feeds), run_ort(out, feeds, topt_library), **tolerance(spec))


@pytest.mark.parametrize("spec", ZOO, ids=str)
def test_compiled_model_with_finite_theta_equals_the_reference_op_in_onnxruntime(spec, compiled, topt_library):
    _, out = compiled(spec, THETA)
    feeds = make_feeds(spec)
    tol = dict(rtol=2e-2, atol=1e-2) if spec.dtype == "float16" else dict(rtol=1e-3, atol=1e-4)
    assert_outputs_close(feeds, run_reference(out, feeds), run_ort(out, feeds, topt_library), **tol)


@pytest.mark.parametrize("spec", [s for s in ZOO if s.dtype == "float32"], ids=str)
def test_first_site_with_finite_theta_gets_the_original_attention_inputs(spec, compiled):
    """Layer 0's inputs do not depend on any threshold: run the original graph up to them, feed
    them to the numpy reference, and compare with the compiled graph's layer-0 output."""
    src, out = compiled(spec, THETA)
    site = find_sites(frontend.load(src))[0]
    names = [v.name if v is not None else None for v in (site.query, site.key, site.value, site.attn_mask, site.past_key, site.past_value)]
    feeds = make_feeds(spec)
    original = onnx.load(src)
    have = {o.name for o in original.graph.output}
    original.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names if n and n not in have)
    values = run_ort(original, feeds)
    q, k, v, mask, pk, pv = (values[n] if n else None for n in names)
    if site.key_layout == "BSHD":
        k = k.transpose(0, 2, 1, 3)
    want = top_theta_attention(q, k, v, mask, pk, pv, np.full((site.Hq, 1), THETA, np.float32), np.array([0]),
                               scale=site.scale, is_causal=site.is_causal)[0]
    dense = top_theta_attention(q, k, v, mask, pk, pv, np.full((site.Hq, 1), -np.inf, np.float32), np.array([0]),
                                scale=site.scale, is_causal=site.is_causal)[0]
    got = run_reference(out, feeds, outputs=[f"topt.{site.id}.Y"])[f"topt.{site.id}.Y"]
    valid = feeds["attention_mask"].astype(bool)[:, -feeds["input_ids"].shape[1]:]  # [B, S]
    sel = lambda y: y.transpose(0, 2, 1, 3)[valid]  # noqa: E731  (rows of real tokens)
    np.testing.assert_allclose(sel(got), sel(want), rtol=1e-4, atol=1e-5)
    assert np.abs(sel(want) - sel(dense)).max() > 1e-3, "THETA drops nothing here: the test would prove nothing"


@pytest.mark.parametrize("is_causal", [0, 1])
def test_attention23_with_its_own_past_inputs_keeps_present_outputs(tmp_path, topt_library, is_causal):
    """The fused form (Attention takes past_key/past_value, gives present_*): not what torch 2.13
    emits for the tiny models, but what the exporter's fusion and other tools write."""
    from onnx import TensorProto as TP
    from onnx import helper as oh
    B, Hq, Hkv, S, P, D = 2, 4, 2, 3, 5, 8
    node = oh.make_node("Attention", ["Q", "K", "V", "mask", "pk", "pv"], ["Y", "present_key", "present_value"], scale=0.3,
                        is_causal=is_causal)
    shapes = {"Q": (B, Hq, S, D), "K": (B, Hkv, S, D), "V": (B, Hkv, S, D), "pk": (B, Hkv, P, D), "pv": (B, Hkv, P, D)}
    inputs = [oh.make_tensor_value_info(n, TP.FLOAT, s) for n, s in shapes.items()]
    inputs.append(oh.make_tensor_value_info("mask", TP.BOOL, (B, 1, S, P + S)))
    outputs = [oh.make_tensor_value_info(n, TP.FLOAT, s) for n, s in
               (("Y", (B, Hq, S, D)), ("present_key", (B, Hkv, P + S, D)), ("present_value", (B, Hkv, P + S, D)))]
    src = tmp_path / "attention.onnx"
    onnx.save(oh.make_model(oh.make_graph([node], "g", inputs, outputs), opset_imports=[oh.make_opsetid("", 23)]), src)
    report = compile_model(src, tmp_path / "sparse.onnx", theta=float("-inf"))
    assert len(report.matched) == 1 and report.matched[0].scale == pytest.approx(0.3)
    assert report.matched[0].is_causal == is_causal
    rng = np.random.default_rng(0)
    feeds = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    feeds["mask"] = np.ones((S, P + S), bool)[None, None].repeat(B, 0)
    feeds["mask"][0, :, :, :2] = False
    want, got = run_ort(src, feeds), run_ort(tmp_path / "sparse.onnx", feeds, topt_library)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5, err_msg=name)
