"""TopThetaCalibrate's CPU kernel (through ONNX Runtime and the topt library) against the numpy
reference, and the thresholds it calibrates used by TopThetaAttention."""
from dataclasses import replace

import numpy as np
import pytest
from onnx import helper

from op_cases import (Case, calibrate_attributes, calibrate_cases, calibrate_inputs, feeds, make_inputs,
                      one_calibrate_model, one_op_model)
from topt_compile.ops.calibrate_reference import sdc_log_mass_from_sums, thresholds_from_sums, top_theta_calibrate
from topt_compile.ops.schema import CALIBRATE_OUTPUTS

CASES = calibrate_cases(120, seed=21)
Y_TOLERANCE = {"float32": 2e-5, "float16": 2e-3}  # as TopThetaAttention's kernel tests


def run_calibrate(make_session, case, inputs, outputs=CALIBRATE_OUTPUTS, node_name="ttc"):
    return make_session(one_calibrate_model(case, inputs, outputs, node_name)).run(list(outputs), feeds(inputs))


def assert_matches_reference(case, got, expected, outputs=CALIBRATE_OUTPUTS):
    for name, g, e in zip(outputs, got, expected):
        if name == "Y":
            tol = Y_TOLERANCE[case.dtype]
            np.testing.assert_allclose(g.astype(np.float64), e.astype(np.float64), equal_nan=True,
                                       atol=tol, rtol=tol, err_msg=f"{case} Y")
        elif name == "theta_sums":  # the kernel's θ_row are float32
            np.testing.assert_array_equal(g[..., 0], e[..., 0], err_msg=f"{case} theta_sums rows")
            np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6, err_msg=f"{case} {name}")
        elif name == "sdc_sums":  # -inf (no row) must match exactly
            np.testing.assert_array_equal(g[..., 0], e[..., 0], err_msg=f"{case} sdc_sums rows")
            np.testing.assert_array_equal(np.isinf(g[..., 1]), np.isinf(e[..., 1]), err_msg=f"{case} sdc_sums -inf")
            finite = np.isfinite(e[..., 1])
            np.testing.assert_allclose(g[..., 1][finite], e[..., 1][finite], atol=1e-5, err_msg=f"{case} {name}")
        else:  # present_key/value are copies and stats are counts: exact
            np.testing.assert_array_equal(g, e, err_msg=f"{case} {name}")


@pytest.mark.parametrize("case", CASES, ids=str)
def test_calibrate_kernel_matches_reference(ort_session_factory, case):
    case, inputs, expected = calibrate_inputs(case)
    assert_matches_reference(case, run_calibrate(ort_session_factory, case, inputs), expected)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("placement,compensation", [("post_softmax", "vmc"), ("pre_softmax", "sdc_exact+vmc"),
                                                    ("pre_softmax", "sdc_exp_threshold"), ("pre_softmax", "none")])
def test_special_rows_match_reference(ort_session_factory, dtype, placement, compensation):
    """A fully masked row, a NaN row, rows with an infinite score and a row of equal scores (a tie
    across the whole row: nothing kept) follow the reference, and none of them is summed."""
    case = Case(B=1, Hq=4, Hkv=2, S=5, Skv=5, P=6, is_causal=0, k=2, mask="bool", fully_masked_row=True, dtype=dtype,
                placement=placement, compensation=compensation)
    case, inputs, _ = calibrate_inputs(case)
    inputs["Q"][0, 0, 1] = np.nan     # head 0, row 1: NaN
    inputs["Q"][0, 1, 2] = 0          # head 1, row 2: every score 0
    inputs["K"][0, 1, 0] = 0          # KV head 1 (heads 2, 3): one key's score is ±inf
    inputs["K"][0, 1, 0, 0] = np.inf
    with np.errstate(invalid="ignore"):
        expected = top_theta_calibrate(**inputs, **calibrate_attributes(case))
    got = run_calibrate(ort_session_factory, case, inputs)
    assert_matches_reference(case, got, expected)
    assert np.isnan(got[0][0, 0, 1]).all()


@pytest.mark.parametrize("outputs", [("Y",), ("Y", "theta_sums"), ("Y", "present_key", "present_value", "sdc_sums"),
                                     ("Y", "stats")])
def test_optional_outputs_can_be_left_out(ort_session_factory, outputs):
    case, inputs, expected = calibrate_inputs(Case(B=2, Hq=8, Hkv=2, S=4, Skv=4, P=9, Dh=64, Dv=64, mask="float", k=3))
    expected = dict(zip(CALIBRATE_OUTPUTS, expected))
    got = run_calibrate(ort_session_factory, case, inputs, outputs)
    assert_matches_reference(case, got, [expected[o] for o in outputs], outputs)


def test_sums_are_bitwise_reproducible_across_runs(ort_session_factory):
    """Units go to threads in a different order each run; the merged sums must not change."""
    case, inputs, _ = calibrate_inputs(Case(B=4, Hq=8, Hkv=2, S=16, Skv=16, P=20, Dh=32, Dv=32, k=4,
                                            placement="pre_softmax", compensation="sdc_exact+vmc"))
    session = ort_session_factory(one_calibrate_model(case, inputs))
    first = session.run(None, feeds(inputs))
    for _ in range(5):
        for a, b in zip(first, session.run(None, feeds(inputs))):
            np.testing.assert_array_equal(a, b)


def _synthetic_batch(rng, B, Hq, Hkv, S, P, D, head_scale):
    """A fixed score distribution: Gaussian Q and K, a per-head temperature, a few 'sink' keys."""
    q = rng.standard_normal((B, Hq, S, D)) * head_scale[None, :, None, None]
    k = rng.standard_normal((B, Hkv, P + S, D))
    k[:, :, :3] += 1.5  # the first keys attract attention, as sinks do
    v = rng.standard_normal((B, Hkv, P + S, D))
    f32 = lambda x: x.astype(np.float32)  # noqa: E731
    return dict(Q=f32(q), K=f32(k[:, :, P:]), V=f32(v[:, :, P:]), past_key=f32(k[:, :, :P]), past_value=f32(v[:, :, :P]))


@pytest.mark.parametrize("placement,compensation", [("post_softmax", "vmc"), ("pre_softmax", "sdc_exact+vmc")])
def test_thresholds_from_the_sums_keep_about_k_on_fresh_rows(ort_session_factory, placement, compensation):
    """Calibrate on 20 batches, θ = mean + 0.1·std per (head, column); TopThetaAttention with those
    θ on new batches of the same distribution keeps k ± 30% per row on average, per head."""
    B, Hq, Hkv, S, P, D, k = 2, 4, 2, 16, 24, 32, 8
    lengths = np.array([0, 28, 34, 64], dtype=np.int64)  # rows have n = P + i + 1 = 25 … 40
    head_scale = np.array([0.6, 1.0, 1.4, 2.0])
    case = Case(B=B, Hq=Hq, Hkv=Hkv, S=S, Skv=S, P=P, Dh=D, Dv=D, is_causal=1, k=k, placement=placement,
                compensation=compensation)
    rng = np.random.default_rng(3)
    calibrate = None
    theta_sums, sdc_sums = 0.0, None
    for _ in range(20):
        inputs = _synthetic_batch(rng, B, Hq, Hkv, S, P, D, head_scale) | {"threshold_lengths": lengths}
        calibrate = calibrate or ort_session_factory(one_calibrate_model(case, inputs, ("Y", "theta_sums", "sdc_sums", "stats")))
        _, t, s, stats = calibrate.run(None, feeds(inputs))
        assert (stats[..., 2] == k * stats[..., 0]).all()  # calibration itself keeps exactly k
        theta_sums = theta_sums + t
        sdc_sums = s if sdc_sums is None else np.stack([sdc_sums[..., 0] + s[..., 0],
                                                        np.logaddexp(sdc_sums[..., 1], s[..., 1])], axis=-1)
    thresholds = thresholds_from_sums(theta_sums)
    assert np.isfinite(thresholds[:, :3]).all() and np.isnan(thresholds[:, 3]).all()  # no row reaches 64
    assert np.isfinite(sdc_log_mass_from_sums(sdc_sums)[:, :3]).all()
    tables = {"thresholds": np.nan_to_num(thresholds, nan=0.0).astype(np.float32), "threshold_lengths": lengths}
    attention, kept, rows = None, np.zeros(Hq), np.zeros(Hq)
    for _ in range(10):
        inputs = _synthetic_batch(rng, B, Hq, Hkv, S, P, D, head_scale) | tables
        attention = attention or ort_session_factory(one_op_model(case, inputs, ("Y", "stats")))
        stats = attention.run(None, feeds(inputs))[1]
        kept += stats[..., 2].sum(axis=0)
        rows += stats[..., 0].sum(axis=0)
    per_row = kept / rows
    assert ((per_row > 0.7 * k) & (per_row < 1.3 * k)).all(), per_row


def test_y_is_dense_softmax_when_k_covers_every_row(ort_session_factory):
    case, inputs, _ = calibrate_inputs(Case(B=2, Hq=4, Hkv=2, S=5, Skv=5, P=7, k=1000, mask="float"))
    y, theta_sums, sdc_sums, stats = run_calibrate(ort_session_factory, case, inputs, ("Y", "theta_sums", "sdc_sums", "stats"))
    dense_case = replace(case, theta_mode="minus_inf", k=0)
    dense_inputs = make_inputs(dense_case)
    dense = ort_session_factory(one_op_model(dense_case, dense_inputs, ("Y",))).run(None, feeds(dense_inputs))[0]
    np.testing.assert_allclose(y, dense, atol=2e-6)
    assert (theta_sums == 0).all() and (sdc_sums[..., 0] == 0).all() and np.isneginf(sdc_sums[..., 1]).all()
    assert (stats[..., 3] == stats[..., 0]).all()


@pytest.mark.parametrize("name,bad,needle", [
    ("Q", lambda x: x[0], "Q"),                                                  # rank 3
    ("K", lambda x: x[:, :, :, :-1], "K"),                                        # Dh differs from Q
    ("past_value", lambda x: x[:, :1], "past_value"),                             # head count
    ("attn_mask", lambda x: x.astype(np.int32), "attn_mask"),                     # dtype
    ("threshold_lengths", lambda x: x.astype(np.int32), "threshold_lengths"),     # dtype
    ("threshold_lengths", lambda x: x[::-1].copy(), "threshold_lengths"),         # not increasing
    ("threshold_lengths", lambda x: x[None], "threshold_lengths"),                # rank 2
    ("threshold_lengths", lambda x: x[:0], "threshold_lengths"),                  # L = 0
])
def test_bad_inputs_raise_an_ort_error_naming_node_and_input(ort_session_factory, name, bad, needle):
    case = Case(B=2, Hq=4, Hkv=2, S=3, Skv=3, P=5, mask="bool", k=2)
    _, inputs, _ = calibrate_inputs(case)
    inputs[name] = bad(inputs[name])
    with pytest.raises(Exception) as error:  # ORT raises its own Fail/InvalidArgument types
        run_calibrate(ort_session_factory, case, inputs, node_name="layer3_calibrate")
    message = str(error.value)
    assert "TopThetaCalibrate" in message and "layer3_calibrate" in message and f"'{needle}'" in message, message


@pytest.mark.parametrize("attribute,value,needle", [
    ("compensation", b"vmc+sdc_exact", "compensation"),   # SDC needs pre_softmax (placement is post_softmax)
    ("k", -1, "k"),
    ("placement", b"softmax", "placement"),
    ("kv_layout", b"shared_buffer", "kv_layout"),        # calibration is concat only
])
def test_bad_attribute_is_an_error_naming_node_and_attribute(ort_session_factory, attribute, value, needle):
    case = Case(k=2)
    _, inputs, _ = calibrate_inputs(case)
    model = one_calibrate_model(case, inputs, node_name="layer0_calibrate")
    node = model.graph.node[0]
    for a in list(node.attribute):
        if a.name == attribute:
            node.attribute.remove(a)
    node.attribute.append(helper.make_attribute(attribute, value))
    with pytest.raises(Exception) as error:
        ort_session_factory(model).run(None, feeds(inputs))
    message = str(error.value)
    assert "layer0_calibrate" in message and f"'{needle}'" in message, message
