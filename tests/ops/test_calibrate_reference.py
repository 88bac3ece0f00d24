"""The numpy reference of TopThetaCalibrate against op.md's defining properties: it is
TopThetaAttention with θ_row, keeps exactly k, and its sums are the direct per-row quantities."""
import itertools
from dataclasses import replace

import numpy as np
import pytest
from onnx.reference import ReferenceEvaluator

from op_cases import COMPENSATIONS, Case, calibrate_attributes, calibrate_inputs, one_calibrate_model
from topt_compile.ops import schema
from topt_compile.ops.calibrate_reference import (TopThetaCalibrate, sdc_log_mass_from_sums, thresholds_from_sums,
                                                  top_theta_calibrate)
from topt_compile.ops.reference import top_theta_attention

PLACEMENT_COMPENSATIONS = [(p, c) for p, comps in COMPENSATIONS.items() for c in comps]


def _float32_at_or_above(x):
    """θ as a float32 threshold keeping the same keys: rounded up, so the (k+1)-th value stays dropped."""
    t = np.float32(x)
    return np.nextafter(t, np.float32(np.inf)) if t < x else t


@pytest.mark.parametrize("placement,compensation", PLACEMENT_COMPENSATIONS)
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_one_row_per_head_equals_top_theta_attention_with_theta_row(placement, compensation, dtype):
    """With one row per head, theta_sums[h, c, 1] is that row's θ_row (and sdc_sums[h, c, 1] its
    ℓ_row): TopThetaAttention with those as thresholds (and sdc_log_mass) gives the same Y and stats."""
    for seed, (Hq, Hkv), P, k, mask in itertools.product(range(3), [(1, 1), (8, 2), (9, 3)], [0, 13], [1, 4], ["none", "float"]):
        base = Case(B=1, Hq=Hq, Hkv=Hkv, S=1, Skv=1 + seed, P=P, dtype=dtype, is_causal=0, mask=mask, k=k,
                    placement=placement, compensation=compensation, seed=seed)
        case, inputs, (y, _, _, theta_sums, sdc_sums, stats) = calibrate_inputs(base)
        rows = theta_sums[..., 0].sum(axis=1)  # per head: 1, or 0 when the row has n <= k
        theta_row = theta_sums[..., 1].sum(axis=1)
        thresholds = np.array([_float32_at_or_above(t) for t in theta_row], np.float32)
        tables = {"thresholds": np.repeat(np.where(rows > 0, thresholds, -np.inf)[:, None], 4, axis=1).astype(np.float32),
                  "threshold_lengths": inputs["threshold_lengths"]}
        if "sdc_calibrated" in compensation:  # the one row's exact dropped mass: sdc_calibrated = sdc_exact
            log_mass = np.where(rows > 0, sdc_sums[..., 1].max(axis=1), 0.0)
            tables["sdc_log_mass"] = np.repeat(log_mass[:, None], 4, axis=1).astype(np.float32)
        attention_inputs = {n: a for n, a in inputs.items() if n != "threshold_lengths"} | tables
        y_att, _, _, _, stats_att = top_theta_attention(**attention_inputs, **(case.attributes | {"calibrated_max_length": 0}))
        tol = 2e-3 if dtype == "float16" else 1e-6
        np.testing.assert_allclose(y.astype(np.float64), y_att.astype(np.float64), atol=tol, err_msg=str(case))
        np.testing.assert_array_equal(stats, stats_att, err_msg=str(case))


@pytest.mark.parametrize("placement,compensation", PLACEMENT_COMPENSATIONS)
def test_rows_longer_than_k_keep_exactly_k_without_ties(placement, compensation):
    case, _, (_, _, _, theta_sums, sdc_sums, stats) = calibrate_inputs(
        Case(B=2, Hq=8, Hkv=2, S=7, Skv=7, P=9, is_causal=1, k=5, placement=placement, compensation=compensation))
    assert (stats[..., 3] == 0).all()  # n = 10 … 16 > k
    np.testing.assert_array_equal(stats[..., 2], case.k * stats[..., 0])
    assert theta_sums[..., 0].sum() == stats[..., 0].sum() == sdc_sums[..., 0].sum()


@pytest.mark.parametrize("placement", ["post_softmax", "pre_softmax"])
def test_ties_at_theta_row_are_all_dropped(placement):
    """Two equal top scores: k = 1 keeps neither (θ_row is the 2nd largest, equal to the 1st);
    k = 2 keeps both; Q = 0 (every score equal) keeps nothing."""
    rng = np.random.default_rng(0)
    D, T = 16, 10
    u = rng.standard_normal(D)
    K = 0.1 * rng.standard_normal((1, 1, T, D))
    K[0, 0, 3] = K[0, 0, 7] = u
    Q = (4 * u)[None, None, None, :]
    f32 = lambda x: x.astype(np.float32)  # noqa: E731
    lengths = np.array([0], np.int64)
    for k, kept in [(1, 0), (2, 2)]:
        stats = top_theta_calibrate(f32(Q), f32(K), f32(K), threshold_lengths=lengths, k=k, placement=placement)[5]
        assert stats[0, 0, 2] == kept
    y, _, _, theta_sums, _, stats = top_theta_calibrate(f32(0 * Q), f32(K), f32(K), threshold_lengths=lengths, k=3,
                                                        placement=placement, compensation="vmc")
    assert stats[0, 0, 2] == 0
    np.testing.assert_allclose(theta_sums[0, 0], [1, 1 / T, 1 / T**2] if placement == "post_softmax" else [1, 0, 0])
    np.testing.assert_allclose(y[0, 0, 0], K[0, 0].mean(axis=0), atol=1e-6)  # all dropped onto v̄


def test_sums_equal_a_direct_computation_of_theta_row_and_dropped_log_mass():
    """Non-causal, no mask, no past: every row has n = Skv, so the sums are plain numpy over rows."""
    case, inputs, (_, _, _, theta_sums, sdc_sums, _) = calibrate_inputs(
        Case(B=3, Hq=6, Hkv=2, S=5, Skv=14, is_causal=0, k=4, placement="pre_softmax", compensation="sdc_exact"))
    q, key = inputs["Q"].astype(np.float64), inputs["K"].astype(np.float64)
    scores = np.einsum("bhsd,bhtd->bhst", q, np.repeat(key, 3, axis=1)) / np.sqrt(case.Dh)
    ordered = -np.sort(-scores, axis=-1)
    theta = ordered[..., case.k]
    dropped_log_mass = np.log(np.exp(ordered[..., case.k:]).sum(axis=-1))
    column = 2  # lengths [0, 5, 12, 20]: n = 14
    assert (theta_sums[:, [0, 1, 3]] == 0).all()
    np.testing.assert_allclose(theta_sums[:, column], np.stack(
        [np.full(6, 15.0), theta.sum(axis=(0, 2)), (theta**2).sum(axis=(0, 2))], axis=-1), rtol=1e-12)
    direct = np.log(np.exp(dropped_log_mass).sum(axis=(0, 2)))
    np.testing.assert_allclose(sdc_sums[:, column, 1], direct, rtol=1e-12)
    np.testing.assert_allclose(sdc_log_mass_from_sums(sdc_sums)[:, column], direct - np.log(15), rtol=1e-12)
    assert np.isneginf(sdc_sums[:, 0, 1]).all() and (sdc_sums[:, 0, 0] == 0).all()


def test_nan_and_infinite_rows_are_not_summed():
    case, inputs, (_, _, _, clean_sums, _, _) = calibrate_inputs(
        Case(B=1, Hq=2, Hkv=1, S=4, Skv=4, P=6, is_causal=0, k=2, compensation="vmc"))
    inputs["Q"][0, 0, 1] = np.nan                # row (h0, i1): NaN scores
    inputs["K"][0, 0, 0] = 0                    # key 6 = [inf, 0, …]: the score is ±inf for every row
    inputs["K"][0, 0, 0, 0] = np.inf
    with np.errstate(invalid="ignore"):  # exp(inf - inf) on the infinite row
        y, _, _, theta_sums, sdc_sums, stats = top_theta_calibrate(**inputs, **calibrate_attributes(case))
    assert np.isnan(y[0, 0, 1]).all() and stats[0, 0, 2] == 10  # the NaN row counts all 10 as kept
    v_mean = np.concatenate([inputs["past_value"], inputs["V"]], axis=2)[0, 0].astype(np.float64).mean(axis=0)
    np.testing.assert_allclose(y[0, 1, 0], v_mean, atol=1e-6)  # an infinite score: nothing kept, Y = v̄
    assert theta_sums[..., 0].sum() == 0 and sdc_sums[..., 0].sum() == 0 and clean_sums[..., 0].sum() == 8


def test_thresholds_from_sums_is_mean_plus_a_tenth_of_std():
    values = np.array([0.1, 0.3, 0.2, 0.6])
    sums = np.zeros((1, 2, 3))
    sums[0, 1] = (len(values), values.sum(), (values**2).sum())
    theta = thresholds_from_sums(sums)
    assert np.isnan(theta[0, 0])
    np.testing.assert_allclose(theta[0, 1], values.mean() + 0.1 * values.std())


def test_onnx_reference_evaluator_runs_the_op():
    case, inputs, expected = calibrate_inputs(Case(B=2, Hq=4, Hkv=2, S=3, Skv=3, P=4, mask="bool", k=2))
    model = one_calibrate_model(case, inputs)
    feeds = {n: a for n, a in inputs.items() if n != "threshold_lengths"}
    got = ReferenceEvaluator(model, new_ops=[TopThetaCalibrate]).run(None, feeds)
    for g, e in zip(got, expected):
        np.testing.assert_array_equal(g, e)


def test_calibrate_node_refuses_shared_buffer_and_calibrated_max_length():
    io = {"Q": "q", "K": "k", "V": "v", "threshold_lengths": "lengths"}
    node = schema.make_calibrate_node(io, {"Y": "y", "theta_sums": "t"}, schema.Attributes(k=3), name="c")
    assert node.op_type == "TopThetaCalibrate" and node.domain == "ai.topt"
    assert {a.name for a in node.attribute} == {"is_causal", "k", "placement", "compensation"}
    with pytest.raises(ValueError, match="kv_layout"):
        schema.make_calibrate_node(io, {"Y": "y"}, schema.Attributes(kv_layout="shared_buffer"))
    with pytest.raises(ValueError, match="calibrated_max_length"):
        schema.make_calibrate_node(io, {"Y": "y"}, schema.Attributes(calibrated_max_length=64))
    with pytest.raises(ValueError, match="threshold_lengths"):
        schema.make_calibrate_node({"Q": "q", "K": "k", "V": "v"}, {"Y": "y"}, schema.Attributes())


def test_bad_threshold_lengths_are_refused_naming_the_input():
    case, inputs, _ = calibrate_inputs(Case(k=2))
    for bad in (np.array([3, 3], np.int64), np.array([], np.int64), np.array([0, 5], np.int32)):
        with pytest.raises(ValueError, match="threshold_lengths"):
            top_theta_calibrate(**(inputs | {"threshold_lengths": bad}), **calibrate_attributes(case))
    with pytest.raises(ValueError, match="compensation"):
        top_theta_calibrate(**inputs, **(calibrate_attributes(case) | {"compensation": "sdc_exact"}))


def test_sdc_calibrated_computes_as_sdc_exact():
    case = Case(B=1, Hq=4, Hkv=2, S=5, Skv=5, P=6, k=3, placement="pre_softmax")
    _, inputs, calibrated = calibrate_inputs(replace(case, compensation="sdc_calibrated+vmc"))
    exact = top_theta_calibrate(**inputs, **calibrate_attributes(replace(case, compensation="sdc_exact+vmc")))
    for a, b in zip(calibrated, exact):
        np.testing.assert_array_equal(a, b)
