"""Site matching: every exporter path of the zoo, hand-built variants, and look-alikes that are not attention."""
import math

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto as TP
from onnx import helper as oh

from models import LAYERS, ZOO, ExportSpec, export, kv_shape
from topt_compile.frontends import onnx as frontend
from topt_compile.match import find_sites

B, H, S, D = 2, 4, 5, 8


@pytest.mark.parametrize("spec", ZOO, ids=str)
def test_every_layer_of_an_exported_model_is_one_matched_site(spec):
    sites = find_sites(frontend.load(export(spec)))
    assert [s.id for s in sites] == [f"layer{i}" for i in range(LAYERS)]
    hkv, dh = kv_shape(spec)
    for s in sites:
        assert s.matched, s.reason
        assert (s.Hq, s.Hkv, s.Dh, s.dtype, s.kv_cache) == (4, hkv, dh, spec.dtype, spec.kv_cache)
        assert (s.present_key is not None) == spec.kv_cache
        assert s.form == ("Attention" if spec.opset == 23 else "sdpa")


def test_softcap_sites_stay_dense_with_the_reason():
    sites = find_sites(frontend.load(export(ExportSpec("gemma2", "torchscript", None, "eager", False))))
    assert len(sites) == LAYERS
    assert all(not s.matched and "softcap" in s.reason for s in sites), [s.reason for s in sites]


# --- hand-built graphs: one variant each --------------------------------------------------------

def _graph(nodes, inputs, inits=(), out="Y", out_shape=(B, H, S, D)):
    vi = [oh.make_tensor_value_info(n, TP.FLOAT, shp) for n, shp in inputs]
    graph = oh.make_graph(nodes, "g", vi, [oh.make_tensor_value_info(out, TP.FLOAT, out_shape)], list(inits))
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 20)])
    return ir.serde.deserialize_model(onnx.shape_inference.infer_shapes(model))


def _c(name, value, dtype=np.float32):
    return onnx.numpy_helper.from_array(np.asarray(value, dtype), name)


def _sdpa(kt_nodes, scale_nodes, mask_nodes=(), extra_inputs=(), probs="P", kname="Kt", unsq_axis=None):
    """Q [B,H,S,D], K [B,H,S,D] (or [B,Hkv,...] expanded), V → attention; the pieces are swappable."""
    nodes = list(kt_nodes) + list(scale_nodes) + list(mask_nodes) + [
        oh.make_node("Softmax", ["M"], ["P"], axis=-1), oh.make_node("MatMul", [probs, "V"], ["Y"])]
    inputs = [("Q", (B, H, S, D)), ("K", (B, H, S, D)), ("V", (B, H, S, D))] + list(extra_inputs)
    return nodes, inputs


def test_div_scaling_on_qk_as_gpt2_writes_it():
    nodes, inputs = _sdpa([oh.make_node("Transpose", ["K"], ["Kt"], perm=[0, 1, 3, 2]),
                           oh.make_node("MatMul", ["Q", "Kt"], ["QK"]), oh.make_node("Div", ["QK", "d"], ["M"])], [])
    (site,) = find_sites(_graph(nodes, inputs, [_c("d", math.sqrt(D))]))
    assert site.matched and site.scale is None and site.variant["qk_scaling"] == "Div" and site.mask == "none"


def test_bool_mask_through_where_and_an_explicit_scale():
    nodes, inputs = _sdpa([oh.make_node("Transpose", ["K"], ["Kt"], perm=[0, 1, 3, 2]),
                           oh.make_node("MatMul", ["Q", "Kt"], ["QK"]), oh.make_node("Mul", ["QK", "s"], ["QKs"]),
                           oh.make_node("Where", ["mask", "QKs", "fill"], ["M"])], [])
    g = oh.make_graph(nodes, "g", [oh.make_tensor_value_info(n, TP.FLOAT, s) for n, s in inputs]
                      + [oh.make_tensor_value_info("mask", TP.BOOL, (B, 1, S, S))],
                      [oh.make_tensor_value_info("Y", TP.FLOAT, (B, H, S, D))], [_c("s", 0.125), _c("fill", -1e9)])
    model = ir.serde.deserialize_model(onnx.shape_inference.infer_shapes(oh.make_model(g, opset_imports=[oh.make_opsetid("", 20)])))
    (site,) = find_sites(model)
    assert site.matched and site.mask == "bool" and site.scale == pytest.approx(0.125)


def test_key_transposed_through_3d_reshape_and_dropout_in_inference():
    nodes, inputs = _sdpa([oh.make_node("Reshape", ["K", "s3"], ["K3"]), oh.make_node("Transpose", ["K3"], ["K3t"], perm=[0, 2, 1]),
                           oh.make_node("Reshape", ["K3t", "s4"], ["Kt"]), oh.make_node("MatMul", ["Q", "Kt"], ["M"])], [],
                          probs="Pd")
    nodes.insert(-1, oh.make_node("Dropout", ["P", "ratio"], ["Pd"]))
    (site,) = find_sites(_graph(nodes, inputs, [_c("s3", [-1, S, D], np.int64), _c("s4", [B, H, D, S], np.int64), _c("ratio", 0.1)]))
    assert site.matched and site.variant["dropout"]


def test_bshd_key_layout_is_matched_and_marked():
    nodes = [oh.make_node("Transpose", ["K"], ["Kt"], perm=[0, 2, 3, 1]), oh.make_node("MatMul", ["Q", "Kt"], ["M"]),
             oh.make_node("Softmax", ["M"], ["P"], axis=-1), oh.make_node("MatMul", ["P", "V"], ["Y"])]
    (site,) = find_sites(_graph(nodes, [("Q", (B, H, S, D)), ("K", (B, S, H, D)), ("V", (B, H, S, D))]))
    assert site.matched and site.key_layout == "BSHD" and site.Hkv == H


def _gqa(axis):
    nodes = [oh.make_node("Unsqueeze", ["K", "ax"], ["Ku"]), oh.make_node("Expand", ["Ku", "es"], ["Ke"]),
             oh.make_node("Reshape", ["Ke", "rs"], ["Kr"]), oh.make_node("Transpose", ["Kr"], ["Kt"], perm=[0, 1, 3, 2]),
             oh.make_node("MatMul", ["Q", "Kt"], ["M"]), oh.make_node("Softmax", ["M"], ["P"], axis=-1),
             oh.make_node("Unsqueeze", ["V", "ax"], ["Vu"]), oh.make_node("Expand", ["Vu", "es"], ["Ve"]),
             oh.make_node("Reshape", ["Ve", "rs"], ["Vr"]), oh.make_node("MatMul", ["P", "Vr"], ["Y"])]
    shape = [B, 2, 2, S, D] if axis == 2 else [B, 2, 2, S, D]
    inits = [_c("ax", [axis], np.int64), _c("es", shape, np.int64), _c("rs", [B, H, S, D], np.int64)]
    return _graph(nodes, [("Q", (B, H, S, D)), ("K", (B, 2, S, D)), ("V", (B, 2, S, D))], inits)


def test_gqa_expansion_is_looked_through_so_the_site_gets_hkv_heads():
    (site,) = find_sites(_gqa(2))
    assert site.matched and (site.Hq, site.Hkv) == (H, 2) and site.key.name == "K" and site.value.name == "V"


def test_gqa_expansion_in_tile_order_stays_dense():
    (site,) = find_sites(_gqa(1))  # Unsqueeze(1) + Expand repeats heads as a tile, not repeat_kv
    assert not site.matched and "repeat_kv" in site.reason


# --- look-alikes -----------------------------------------------------------------------------

def test_a_classifier_softmax_between_weight_matmuls_is_not_a_site():
    nodes = [oh.make_node("MatMul", ["X", "W1"], ["L"]), oh.make_node("Softmax", ["L"], ["P"], axis=-1),
             oh.make_node("MatMul", ["P", "W2"], ["Y"])]
    model = _graph(nodes, [("X", (B, S, D))], [_c("W1", np.ones((D, D))), _c("W2", np.ones((D, D)))], out_shape=(B, S, D))
    assert find_sites(model) == []


def test_softmax_over_the_head_axis_is_not_matched():
    nodes, inputs = _sdpa([oh.make_node("Transpose", ["K"], ["Kt"], perm=[0, 1, 3, 2]), oh.make_node("MatMul", ["Q", "Kt"], ["M"])], [])
    nodes[-2] = oh.make_node("Softmax", ["M"], ["P"], axis=1)
    sites = find_sites(_graph(nodes, inputs))
    assert [s.matched for s in sites] == [False] and "axis" in sites[0].reason


def test_3d_matmul_softmax_matmul_without_a_key_transpose_is_not_matched():
    nodes = [oh.make_node("MatMul", ["A", "Bm"], ["M"]), oh.make_node("Softmax", ["M"], ["P"], axis=-1),
             oh.make_node("MatMul", ["P", "C"], ["Y"])]
    sites = find_sites(_graph(nodes, [("A", (B, S, D)), ("Bm", (B, D, S)), ("C", (B, S, D))], out_shape=(B, S, D)))
    assert not any(s.matched for s in sites)


def _attention23(is_causal, past):
    ins = ["Q", "K", "V", "", "pk", "pv"] if past else ["Q", "K", "V"]
    outs = ["Y", "pres_k", "pres_v"] if past else ["Y"]
    nodes = [oh.make_node("Attention", ins, outs, is_causal=is_causal)]
    inputs = [("Q", (B, H, S, D)), ("K", (B, 2, S, D)), ("V", (B, 2, S, D))]
    inputs += [("pk", (B, 2, 3, D)), ("pv", (B, 2, 3, D))] if past else []
    vi = [oh.make_tensor_value_info(n, TP.FLOAT, shp) for n, shp in inputs]
    out = [oh.make_tensor_value_info(o, TP.FLOAT, None) for o in outs]
    model = oh.make_model(oh.make_graph(nodes, "g", vi, out), opset_imports=[oh.make_opsetid("", 23)])
    return ir.serde.deserialize_model(onnx.shape_inference.infer_shapes(model))


def test_attention23_with_internal_past_and_gqa_heads_is_matched():
    (site,) = find_sites(_attention23(0, past=True))
    assert site.matched and (site.Hq, site.Hkv) == (H, 2) and site.past_key.name == "pk" and site.present_key.name == "pres_k"


def test_attention23_causal_is_matched_with_and_without_a_cache():
    """With Skv = S both ORT's Attention and TopThetaAttention put query i at position P + i."""
    for past in (False, True):
        (site,) = find_sites(_attention23(1, past=past))
        assert site.matched and site.is_causal == 1
