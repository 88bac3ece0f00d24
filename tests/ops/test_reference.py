"""The numpy reference against oracles it did not write (ONNX Runtime's Attention-23) and op.md's
defining properties."""
from dataclasses import replace

import numpy as np
import pytest

from op_cases import Case, attention23, comparable_with_attention23, make_inputs, sampled_cases
from topt_compile.ops.reference import top_theta_attention, TopThetaAttention
from topt_compile.ops.schema import Compensation


DENSE_CASES = [c for c in sampled_cases(80, seed=7) if comparable_with_attention23(c)]


@pytest.mark.parametrize("case", DENSE_CASES, ids=str)
def test_minus_inf_thresholds_equal_onnxruntime_attention23(case):
    case = replace(case, theta_mode="minus_inf", with_past_v_sum=False)
    inputs = make_inputs(case)
    y = top_theta_attention(**inputs, **case.attributes)[0]
    oracle = attention23({n: inputs[n] for n in inputs if n in ("Q", "K", "V", "attn_mask", "past_key", "past_value")},
                         case.is_causal)
    tol = 2e-3 if case.dtype == "float16" else 2e-5
    np.testing.assert_allclose(y.astype(np.float64), oracle.astype(np.float64), atol=tol, rtol=tol)


def test_scale_attribute_matches_attention23_scale():
    case = Case(B=2, Hq=8, Hkv=2, S=4, Skv=4, P=3, Dh=64, Dv=64, theta_mode="minus_inf", is_causal=0)
    inputs = make_inputs(case)
    y = top_theta_attention(**inputs, **(case.attributes | {"scale": 0.3}))[0]
    np.testing.assert_allclose(y, attention23({n: inputs[n] for n in ("Q", "K", "V", "past_key", "past_value")}, 0, 0.3),
                               atol=2e-5)


@pytest.mark.parametrize("placement,compensation", [("post_softmax", "vmc"), ("pre_softmax", "sdc_exact+vmc"),
                                                    ("pre_softmax", "none"), ("pre_softmax", "sdc_calibrated+vmc")])
def test_rows_no_longer_than_k_are_dense_whatever_theta(placement, compensation):
    case = Case(B=2, Hq=4, Hkv=2, S=6, Skv=6, P=4, is_causal=1, placement=placement, compensation=compensation,
                theta_mode="keep_none", k=100)
    inputs = make_inputs(case)
    dense_case = replace(case, theta_mode="minus_inf", k=0)
    dense = top_theta_attention(**make_inputs(dense_case), **dense_case.attributes)
    sparse = top_theta_attention(**inputs, **case.attributes)
    np.testing.assert_allclose(sparse[0], dense[0], atol=1e-6)
    assert (sparse[4][..., 3] == sparse[4][..., 0]).all()  # every row counted as dense


def test_keep_none_gives_v_mean_with_vmc_and_zero_without():
    case = Case(B=1, Hq=2, Hkv=1, S=3, Skv=3, P=9, is_causal=1, placement="pre_softmax", theta_mode="keep_none")
    inputs = make_inputs(case)
    v_all = np.concatenate([inputs["past_value"], inputs["V"]], axis=2).astype(np.float64)
    for compensation, expect_mean in [("vmc", True), ("none", False), ("sdc_exact+vmc", False)]:
        y = top_theta_attention(**inputs, **(case.attributes | {"compensation": compensation}))[0]
        for i in range(case.S):
            n = case.P + i + 1
            expected = v_all[0, 0, :n].mean(axis=0) if expect_mean else np.zeros(case.Dv)
            if compensation == "sdc_exact+vmc":  # the exact dropped mass is everything: p_j stay softmax, all dropped
                expected = v_all[0, 0, :n].mean(axis=0)
            np.testing.assert_allclose(y[0, 0, i], expected, atol=1e-5)


def test_post_softmax_keeps_exactly_the_probabilities_above_theta():
    case = Case(B=2, Hq=4, Hkv=2, S=5, Skv=5, P=20, is_causal=1, placement="post_softmax", theta_mode="mixed")
    inputs = make_inputs(case)
    _, _, _, _, stats = top_theta_attention(**inputs, **case.attributes)
    q, k_all = inputs["Q"].astype(np.float64), np.concatenate([inputs["past_key"], inputs["K"]], 2).astype(np.float64)
    kept = np.zeros((2, 4), dtype=np.int64)
    for b in range(2):
        for h in range(4):
            for i in range(5):
                n = 20 + i + 1
                a = k_all[b, h // 2, :n] @ q[b, h, i] / np.sqrt(case.Dh)
                p = np.exp(a - a.max()) / np.exp(a - a.max()).sum()
                col = np.searchsorted(inputs["threshold_lengths"], n, side="right") - 1
                kept[b, h] += (p > inputs["thresholds"][h, col]).sum()
    np.testing.assert_array_equal(stats[..., 2], kept)
    assert 0 < kept.sum() < stats[..., 1].sum()  # the case really drops something and keeps something


def test_post_softmax_with_vmc_moves_dropped_mass_onto_v_mean():
    case = Case(B=1, Hq=1, Hkv=1, S=1, Skv=1, P=30, is_causal=1, theta_mode="mixed")
    inputs = make_inputs(case)
    y_vmc = top_theta_attention(**inputs, **case.attributes)[0].astype(np.float64)
    y_none = top_theta_attention(**inputs, **(case.attributes | {"compensation": "none"}))[0].astype(np.float64)
    v_all = np.concatenate([inputs["past_value"], inputs["V"]], 2).astype(np.float64)[0, 0]
    k_all = np.concatenate([inputs["past_key"], inputs["K"]], 2).astype(np.float64)[0, 0]
    a = k_all @ inputs["Q"][0, 0, 0].astype(np.float64) / np.sqrt(case.Dh)
    p = np.exp(a - a.max()) / np.exp(a - a.max()).sum()
    keep = p > inputs["thresholds"][0, -1]
    np.testing.assert_allclose(y_none[0, 0, 0], p[keep] @ v_all[keep], atol=1e-5)
    np.testing.assert_allclose(y_vmc[0, 0, 0], p[keep] @ v_all[keep] + (1 - p[keep].sum()) * v_all.mean(0), atol=1e-5)


def test_sdc_exact_with_vmc_uses_full_softmax_probabilities():
    """pre-softmax + exact SDC: p_j = e_j / Z, the same weights post-softmax uses, kept by score."""
    case = Case(B=1, Hq=2, Hkv=1, S=2, Skv=2, P=25, placement="pre_softmax", compensation="sdc_exact+vmc")
    inputs = make_inputs(case)
    y = top_theta_attention(**inputs, **case.attributes)[0].astype(np.float64)
    v_all = np.concatenate([inputs["past_value"], inputs["V"]], 2).astype(np.float64)[0, 0]
    k_all = np.concatenate([inputs["past_key"], inputs["K"]], 2).astype(np.float64)[0, 0]
    for h in range(2):
        for i in range(2):
            n = 25 + i + 1
            a = k_all[:n] @ inputs["Q"][0, h, i].astype(np.float64) / np.sqrt(case.Dh)
            p = np.exp(a - a.max()) / np.exp(a - a.max()).sum()
            keep = a > inputs["thresholds"][h, -1]
            expected = p[keep] @ v_all[:n][keep] + (1 - p[keep].sum()) * v_all[:n].mean(0)
            np.testing.assert_allclose(y[0, h, i], expected, atol=1e-5)


def test_past_v_sum_replaces_reading_past_values():
    case = Case(B=2, Hq=4, Hkv=2, S=1, Skv=1, P=17, is_causal=1, theta_mode="mixed")
    inputs = make_inputs(case)
    with_sum = dict(inputs, past_v_sum=inputs["past_value"].astype(np.float64).sum(2).astype(np.float32))
    a = top_theta_attention(**inputs, **case.attributes)
    b = top_theta_attention(**with_sum, **case.attributes)
    np.testing.assert_allclose(a[0], b[0], atol=1e-5)
    np.testing.assert_allclose(a[3], b[3], atol=1e-4)  # present_v_sum continues the running sum
    expected_sum = np.concatenate([inputs["past_value"], inputs["V"]], 2).astype(np.float64).sum(2)
    np.testing.assert_allclose(b[3], expected_sum, atol=1e-4)


def test_shared_buffer_equals_concat_on_the_valid_rows():
    rng = np.random.default_rng(3)
    B, Hq, Hkv, S, M, D = 2, 6, 3, 2, 12, 16
    lengths = np.array([4, 7], dtype=np.int32)
    q = rng.standard_normal((B, Hq, S, D)).astype(np.float32)
    k, v = (rng.standard_normal((B, Hkv, S, D)).astype(np.float32) for _ in range(2))
    buf_k, buf_v = (rng.standard_normal((B, Hkv, M, D)).astype(np.float32) for _ in range(2))
    th, ln = rng.uniform(0.02, 0.3, (Hq, 1)).astype(np.float32), np.array([0])
    y, pk, pv, _, stats = top_theta_attention(q, k, v, None, buf_k, buf_v, th, ln, lengths, is_causal=1,
                                              kv_layout="shared_buffer")
    for b in range(B):
        p = lengths[b]
        yc, pkc, _, _, stats_c = top_theta_attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], None, buf_k[b:b + 1, :, :p],
                                                     buf_v[b:b + 1, :, :p], th, ln, is_causal=1)
        np.testing.assert_allclose(y[b:b + 1], yc, atol=1e-6)
        np.testing.assert_array_equal(pk[b, :, :p + S], pkc[0])
        np.testing.assert_array_equal(pk[b, :, p + S:], buf_k[b, :, p + S:])  # the rest of the buffer is untouched
        np.testing.assert_array_equal(stats[b], stats_c[0])


def test_fully_masked_rows_are_zero_and_not_counted():
    case = Case(B=1, Hq=2, Hkv=1, S=3, Skv=3, mask="float", fully_masked_row=True, is_causal=0)
    inputs = make_inputs(case)
    inputs["attn_mask"] = np.broadcast_to(inputs["attn_mask"], (1, 2, 3, 3)).copy()
    inputs["attn_mask"][..., 0, :] = np.finfo(np.float32).min
    y, *_, stats = top_theta_attention(**inputs, **case.attributes)
    assert (y[..., 0, :] == 0).all()
    assert (stats[..., 0] == 2).all()


def test_nan_score_makes_its_row_nan_and_only_its_row():
    case = Case(B=1, Hq=2, Hkv=1, S=2, Skv=2, P=3, is_causal=0)
    inputs = make_inputs(case)
    inputs["Q"][0, 1, 0, 0] = np.nan
    y = top_theta_attention(**inputs, **case.attributes)[0]
    assert np.isnan(y[0, 1, 0]).all() and np.isfinite(y[0, 1, 1]).all() and np.isfinite(y[0, 0]).all()


def test_score_equal_to_theta_is_dropped():
    q = np.ones((1, 1, 1, 4), np.float32)
    k = np.array([[[[1, 0, 0, 0], [0.5, 0, 0, 0], [0.25, 0, 0, 0]]]], np.float32)  # scores 0.5, 0.25, 0.125
    v = np.eye(3, dtype=np.float32)[None, None]
    y, *_, stats = top_theta_attention(q, k, v, thresholds=np.array([[0.25]], np.float32),
                                       threshold_lengths=np.array([0]), placement="pre_softmax", compensation="none")
    np.testing.assert_allclose(y[0, 0, 0], [1, 0, 0], atol=1e-7)
    assert stats[0, 0, 2] == 1


def test_group_union_counts_v_rows_once_per_group():
    case = Case(B=1, Hq=9, Hkv=3, S=1, Skv=1, P=40, theta_mode="mixed")
    inputs = make_inputs(case)
    stats = top_theta_attention(**inputs, **case.attributes)[4]
    for g in range(3):
        group = stats[0, 3 * g:3 * g + 3]
        assert (group[:, 5] == group[0, 5]).all()
        assert group[:, 2].max() <= group[0, 5] <= group[:, 2].sum()


def test_threshold_column_is_a_step_function_of_row_length():
    rng = np.random.default_rng(0)
    for n, expected_col in [(1, 0), (4, 0), (5, 1), (11, 1), (12, 2), (19, 2), (20, 3), (500, 3)]:
        q = rng.standard_normal((1, 1, 1, 8)).astype(np.float32)
        k = rng.standard_normal((1, 1, n, 8)).astype(np.float32)
        v = rng.standard_normal((1, 1, n, 8)).astype(np.float32)
        thresholds = np.array([[-np.inf, -np.inf, -np.inf, -np.inf]], np.float32)
        thresholds[0, expected_col] = np.inf  # only the selected column drops everything
        stats = top_theta_attention(q, k, v, thresholds=thresholds, threshold_lengths=np.array([0, 5, 12, 20]),
                                    is_causal=0, placement="pre_softmax", compensation="none")[4]
        assert stats[0, 0, 2] == 0, n


@pytest.mark.parametrize("bad,message", [
    (dict(compensation="vmc+sdc_exact"), "needs placement=pre_softmax"),
    (dict(compensation="sdc_exact+sdc_exp_threshold", placement="pre_softmax"), "at most one"),
    (dict(compensation="wmc"), "unknown token"),
    (dict(placement="mid_softmax"), "placement"),
    (dict(k=-1), "k: expected"),
])
def test_bad_attributes_raise_naming_the_attribute(bad, message):
    case = Case()
    with pytest.raises(ValueError, match=message):
        top_theta_attention(**make_inputs(case), **(case.attributes | bad))


def test_bad_shapes_raise_naming_the_input():
    case = Case(B=2, Hq=4, Hkv=2)
    inputs = make_inputs(case)
    with pytest.raises(ValueError, match="^K: Hq=4 is not a multiple"):
        top_theta_attention(**dict(inputs, K=inputs["K"][:, :1].repeat(3, 1), V=inputs["V"][:, :1].repeat(3, 1)),
                            **case.attributes)
    with pytest.raises(ValueError, match="^thresholds"):
        top_theta_attention(**dict(inputs, thresholds=inputs["thresholds"][:2]), **case.attributes)
    with pytest.raises(ValueError, match="^attn_mask"):
        top_theta_attention(**dict(inputs, attn_mask=np.ones((3, 3, 3), bool)), **case.attributes)


def test_compensation_round_trips_through_its_text_form():
    for text in ["none", "vmc", "sdc_exact", "sdc_exact+vmc", "sdc_calibrated+vmc"]:
        assert str(Compensation.parse(text, "pre_softmax")) == text


def test_reference_evaluator_runs_the_op_class():
    from op_cases import feeds, one_op_model
    from onnx.reference import ReferenceEvaluator

    case = Case(B=2, Hq=8, Hkv=2, S=3, Skv=3, P=6, mask="bool")
    inputs = make_inputs(case)
    model = one_op_model(case, inputs)
    got = ReferenceEvaluator(model, new_ops=[TopThetaAttention]).run(None, feeds(inputs))
    for a, b in zip(got, top_theta_attention(**inputs, **case.attributes)):
        np.testing.assert_array_equal(a, b)
