"""TopThetaGroupQueryAttention on the CPU: the numpy reference against onnxruntime's own
com.microsoft GroupQueryAttention (θ = −inf: dense), and the library against the reference."""
import re
from dataclasses import replace

import numpy as np
import onnxruntime as ort
import pytest

from gqa_cases import GqaCase, feeds, gqa_inputs, ort_gqa_model, reference, topt_gqa_model

CASES = [
    GqaCase(),                                                         # decode, packed, rotary
    GqaCase(S=1, past=(0, 12), packed=False, seed=1),                  # a row with no past
    GqaCase(S=7, past=(0, 0), seed=2),                                 # prefill
    GqaCase(S=5, past=(4, 11), interleaved=True, seed=3),              # chunk after a past (B = 2)
    GqaCase(B=1, S=3, past=(6,), D=32, rotary_dim=16, packed=False, seed=4),  # partial rotary
    GqaCase(S=3, past=(6, 2), rotary_dim=8, interleaved=True, seed=11),  # partial, interleaved, B = 2 chunk
    GqaCase(S=1, past=(13, 3), rotary=False, seed=5),
    GqaCase(S=2, past=(1, 7), positions=True, seed=6),
    GqaCase(B=1, S=1, past=(20,), Hq=9, Hkv=3, D=64, rotary_dim=64, dtype="float16", seed=7),
    GqaCase(B=3, S=4, past=(0, 5, 9), Hq=8, Hkv=8, D=32, rotary_dim=32, dtype="float16", seed=8),
    GqaCase(S=1, past=(9, 4), placement="pre_softmax", compensation="sdc_exact+vmc", seed=9),
    GqaCase(S=6, past=(0, 3), placement="pre_softmax", compensation="none", seed=10),
]
TOL = {"float32": 5e-5, "float16": 3e-3}
# What onnxruntime's CPU GroupQueryAttention accepts: chunks after a past only at B = 1, cos_cache
# widths that are multiples of 8, and it reads position_ids only in another rotary path.
ORT_CASES = [c for c in CASES if (c.S == 1 or c.B == 1 or max(c.past) == 0) and (not c.rotary or c.rotary_dim % 16 == 0)
             and not c.positions]


def _session(model, library=None):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if library:
        options.register_custom_ops_library(library)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("case", ORT_CASES, ids=str)
def test_reference_at_minus_inf_is_onnxruntime_group_query_attention(case):
    """The front (unpacking, RoPE, positions, past lengths) is GQA's: same output and cache."""
    inputs = gqa_inputs(case, theta="minus_inf")
    expected = reference(case, inputs)
    got = _session(ort_gqa_model(case, inputs)).run(None, {n: a for n, a in inputs.items()
                                                          if n not in ("thresholds", "threshold_lengths")})
    tol = TOL[case.dtype]
    valid = np.arange(case.M)[None, None, :, None] < (np.asarray(case.past) + case.S)[:, None, None, None]
    for name, g, e in zip(("output", "present_key", "present_value"), got, expected):
        if name != "output":  # rows past a row's length: GQA zeroes them, the op leaves the buffer's
            g, e = np.where(valid, g, 0), np.where(valid, e, 0)
        np.testing.assert_allclose(g.astype(np.float64), e.astype(np.float64), atol=tol, rtol=tol, err_msg=f"{case} {name}")


@pytest.mark.parametrize("case", CASES, ids=str)
def test_library_matches_the_reference(topt_library, case):
    inputs = gqa_inputs(case)
    expected = reference(case, inputs)
    outputs = ("output", "present_key", "present_value", "present_v_sum", "stats")
    got = _session(topt_gqa_model(case, inputs, outputs), topt_library).run(None, feeds(inputs))
    tol = TOL[case.dtype]
    np.testing.assert_allclose(got[0].astype(np.float64), expected[0].astype(np.float64), atol=tol, rtol=tol,
                               err_msg=f"{case} output")
    # new K rows are rotated in float32 by the kernel, in float64 by the reference: an ulp apart
    np.testing.assert_allclose(got[1].astype(np.float64), expected[1].astype(np.float64), atol=tol, rtol=tol,
                               err_msg=f"{case} present_key")
    np.testing.assert_array_equal(got[2], expected[2], err_msg=f"{case} present_value")
    np.testing.assert_allclose(got[3], expected[3], rtol=1e-4, atol=1e-3, err_msg=f"{case} present_v_sum")
    np.testing.assert_array_equal(got[4], expected[4], err_msg=f"{case} stats")


@pytest.mark.parametrize("field, value, message", [
    ("seqlens_k", np.array([40, 3], np.int32), "input 'seqlens_k': seqlens_k[0] = 40 out of range"),
    ("position_ids", np.array([[99], [1]], np.int64), "input 'position_ids': position 99 of row 0 is outside the rotary cache"),
])
def test_bad_lengths_are_an_error_naming_the_node_and_input(topt_library, field, value, message):
    case = replace(CASES[0], positions=True)
    inputs = gqa_inputs(case)
    session = _session(topt_gqa_model(case, inputs), topt_library)
    with pytest.raises(Exception, match=re.escape("TopThetaGroupQueryAttention node 'ttg': " + message)):
        session.run(None, feeds({**inputs, field: value}))


def test_float16_conversion_keeps_the_float32_slots_and_the_op_runs(topt_library):
    """topt_compile.fp16.convert on a float32 model of the op: T becomes float16, θ stays float32."""
    from topt_compile import fp16
    case = CASES[0]
    model = fp16.convert(topt_gqa_model(case, gqa_inputs(case)))
    types = {v.name: v.type.tensor_type.elem_type for v in model.graph.input}
    assert types["query"] == 10 and types["past_key"] == 10 and types["thresholds"] == 1  # float16, float32
    case16 = replace(case, dtype="float16")
    inputs = gqa_inputs(case16)
    expected = reference(case16, inputs)
    got = _session(model, topt_library).run(["output"], feeds(inputs))[0]
    np.testing.assert_allclose(got.astype(np.float64), expected[0].astype(np.float64), atol=3e-3, rtol=3e-3)


@pytest.mark.parametrize("S", [1, 6])
def test_dense_prompt_keeps_every_key_of_a_prompt_and_only_of_a_prompt(topt_library, S):
    """dense_prompt = 1: a call with S > 1 equals the θ = −inf op; a decode step (S = 1) is unchanged."""
    case = GqaCase(S=S, past=(0, 0) if S > 1 else (7, 3), k=0, seed=40)
    inputs = gqa_inputs(case)
    outputs = ("output", "present_key", "present_value", "present_v_sum", "stats")
    run = lambda c, x: _session(topt_gqa_model(c, x, outputs), topt_library).run(None, feeds(x))  # noqa: E731
    got = run(replace(case, dense_prompt=1), dict(inputs))
    sparse = run(case, dict(inputs))
    dense = run(case, {**inputs, "thresholds": np.full_like(inputs["thresholds"], -np.inf)})
    want = dense if S > 1 else sparse
    np.testing.assert_allclose(got[0], want[0], atol=1e-6, rtol=1e-6)  # dense rows and θ = −inf rows: two code paths
    np.testing.assert_array_equal(got[4][..., 2], want[4][..., 2])  # kept elements
    assert (S > 1) == bool((got[4][..., 2] > sparse[4][..., 2]).any()), "the sparse op must drop keys here"
    np.testing.assert_allclose(got[0], reference(replace(case, dense_prompt=1), dict(inputs))[0], atol=5e-5, rtol=5e-5)
