"""The CPU kernel (through ONNX Runtime and the topt library) against the numpy reference."""
from dataclasses import replace

import numpy as np
import onnxruntime as ort
import pytest

from op_cases import Case, attention23, comparable_with_attention23, covering_cases, feeds, make_inputs, one_op_model, reference_outputs, sampled_cases
from topt_compile.ops.schema import OUTPUTS

CASES = covering_cases() + sampled_cases(160, seed=1)
Y_TOLERANCE = {"float32": 2e-5, "float16": 2e-3}  # fp16: the output's own rounding, ~1 ulp at |y| ≤ 2


def run_library(make_session, case, inputs, outputs=OUTPUTS):
    return make_session(one_op_model(case, inputs, outputs)).run(list(outputs), feeds(inputs))


def assert_matches_reference(case, got, expected, outputs=OUTPUTS):
    for name, g, e in zip(outputs, got, expected):
        if name == "Y":
            np.testing.assert_allclose(g.astype(np.float64), e.astype(np.float64), equal_nan=True,
                                       atol=Y_TOLERANCE[case.dtype], rtol=Y_TOLERANCE[case.dtype], err_msg=f"{case} Y")
        elif name == "present_v_sum":
            np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-4, err_msg=f"{case} {name}")
        else:  # present_key/value are copies and stats are counts: exact
            np.testing.assert_array_equal(g, e, err_msg=f"{case} {name}")


@pytest.mark.parametrize("case", CASES, ids=str)
def test_cpu_kernel_matches_reference(ort_session_factory, case):
    inputs = make_inputs(case)
    expected = reference_outputs(case, inputs)
    assert_matches_reference(case, run_library(ort_session_factory, case, inputs), expected)


@pytest.mark.parametrize("outputs", [("Y",), ("Y", "stats"), ("Y", "present_key", "present_value")])
def test_optional_outputs_can_be_left_out(ort_session_factory, outputs):
    case = Case(B=2, Hq=8, Hkv=2, S=4, Skv=4, P=9, Dh=64, Dv=64, mask="float")
    inputs = make_inputs(case)
    expected = dict(zip(OUTPUTS, reference_outputs(case, inputs)))
    got = run_library(ort_session_factory, case, inputs, outputs)
    assert_matches_reference(case, got, [expected[o] for o in outputs], outputs)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_minus_inf_thresholds_equal_onnxruntime_attention23(ort_session_factory, dtype):
    for case in filter(comparable_with_attention23, sampled_cases(60, seed=11, dtypes=(dtype,))):
        case = replace(case, theta_mode="minus_inf", with_past_v_sum=False)
        inputs = make_inputs(case)
        y = run_library(ort_session_factory, case, inputs, ("Y",))[0]
        oracle = attention23({n: inputs[n] for n in ("Q", "K", "V", "attn_mask", "past_key", "past_value") if n in inputs},
                             case.is_causal)
        tol = Y_TOLERANCE[dtype]
        np.testing.assert_allclose(y.astype(np.float64), oracle.astype(np.float64), atol=tol, rtol=tol, err_msg=str(case))


def test_shared_buffer_bound_in_place_writes_only_the_new_rows(ort_session_factory):
    """past and present bound to one OrtValue (I/O binding): decode without copying the cache."""
    case = Case(B=2, Hq=9, Hkv=3, S=1, Skv=1, P=64, Dh=64, Dv=64, kv_layout="shared_buffer", mask="none",
                with_past_v_sum=True)
    inputs = make_inputs(case)
    expected = reference_outputs(case, inputs)
    session = ort_session_factory(one_op_model(case, inputs))
    cache_k = ort.OrtValue.ortvalue_from_numpy(inputs["past_key"].copy())
    cache_v = ort.OrtValue.ortvalue_from_numpy(inputs["past_value"].copy())
    binding = session.io_binding()
    for name, value in feeds(inputs).items():
        if name not in ("past_key", "past_value"):
            binding.bind_cpu_input(name, value)
    binding.bind_ortvalue_input("past_key", cache_k)
    binding.bind_ortvalue_input("past_value", cache_v)
    binding.bind_output("Y")  # outputs come back in the order they are bound
    binding.bind_ortvalue_output("present_key", cache_k)
    binding.bind_ortvalue_output("present_value", cache_v)
    binding.bind_output("present_v_sum")
    binding.bind_output("stats")
    session.run_with_iobinding(binding)
    outputs = dict(zip(("Y", "present_key", "present_value", "present_v_sum", "stats"), binding.get_outputs()))
    y, v_sum, stats = (outputs[n].numpy() for n in ("Y", "present_v_sum", "stats"))
    np.testing.assert_allclose(y, expected[0], atol=2e-5)
    np.testing.assert_array_equal(cache_k.numpy(), expected[1])  # the cache itself now holds the new rows
    np.testing.assert_array_equal(cache_v.numpy(), expected[2])
    np.testing.assert_allclose(v_sum, expected[3], rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(stats, expected[4])


def test_decode_loop_in_shared_buffer_equals_one_concat_prefill(ort_session_factory):
    """Prefill then step-by-step decode with the running V sum gives the rows one prefill gives."""
    rng = np.random.default_rng(5)
    B, Hq, Hkv, D, T, M = 1, 8, 2, 32, 24, 32
    q = rng.standard_normal((B, Hq, T, D)).astype(np.float32)
    k, v = (rng.standard_normal((B, Hkv, T, D)).astype(np.float32) for _ in range(2))
    tables = {"thresholds": rng.uniform(0.01, 0.2, (Hq, 2)).astype(np.float32),
              "threshold_lengths": np.array([0, 10], dtype=np.int64)}
    full_case = Case(B=B, Hq=Hq, Hkv=Hkv, S=T, Skv=T, P=0, Dh=D, Dv=D, is_causal=1, k=4)
    full = dict(Q=q, K=k, V=v, **tables)
    y_full = run_library(ort_session_factory, full_case, full, ("Y",))[0]
    step_case = replace(full_case, S=1, Skv=1, P=M, kv_layout="shared_buffer")
    step_inputs = dict(Q=q[:, :, :1], K=k[:, :, :1], V=v[:, :, :1], past_key=np.zeros((B, Hkv, M, D), np.float32) + 7,
                       past_value=np.zeros((B, Hkv, M, D), np.float32) + 7, past_seqlens=np.zeros(B, np.int32),
                       past_v_sum=np.zeros((B, Hkv, D), np.float32), **tables)
    session = ort_session_factory(one_op_model(step_case, step_inputs))
    for t in range(T):
        step = dict(step_inputs, Q=q[:, :, t:t + 1], K=k[:, :, t:t + 1], V=v[:, :, t:t + 1],
                    past_seqlens=np.full(B, t, np.int32))
        y, pk, pv, v_sum, _ = session.run(None, feeds(step))
        np.testing.assert_allclose(y[:, :, 0], y_full[:, :, t], atol=3e-5, err_msg=f"step {t}")
        step_inputs.update(past_key=pk, past_value=pv, past_v_sum=v_sum)


@pytest.mark.parametrize("name,bad,needle", [
    ("Q", lambda x: x[0], "Q"),                                   # rank 3
    ("K", lambda x: x[:, :, :, :-1], "K"),                         # Dh differs from Q
    ("past_value", lambda x: x[:, :1], "past_value"),               # head count
    ("attn_mask", lambda x: x.astype(np.int32), "attn_mask"),      # dtype (the mask takes bool or T)
    ("thresholds", lambda x: x[:, :2], "thresholds"),              # [Hq, L] vs lengths
    ("attn_mask", lambda x: np.ones((2, 3, 3, 8), bool), "attn_mask"),  # not broadcastable
])
def test_bad_inputs_raise_an_ort_error_naming_node_and_input(ort_session_factory, name, bad, needle):
    case = Case(B=2, Hq=4, Hkv=2, S=3, Skv=3, P=5, mask="bool")
    inputs = make_inputs(case)
    inputs[name] = bad(inputs[name])
    with pytest.raises(Exception) as error:  # ORT raises its own Fail/InvalidArgument types
        ort_session_factory(one_op_model(case, inputs, node_name="layer3_attention")).run(None, feeds(inputs))
    message = str(error.value)
    assert "layer3_attention" in message and needle in message, message


def test_unsupported_dtype_is_refused_naming_the_node(ort_session_factory):
    case = Case(B=1, Hq=2, Hkv=1, S=2, Skv=2)
    inputs = {n: (a.astype(np.float64) if n in ("Q", "K", "V") else a) for n, a in make_inputs(case).items()}
    model = one_op_model(case, inputs, node_name="layer7_attention")
    with pytest.raises(Exception, match="layer7_attention"):  # no kernel for float64: refused at load
        ort_session_factory(model).run(None, feeds(inputs))


def test_bad_attribute_is_an_error_naming_node_and_attribute(ort_session_factory):
    case = Case()
    inputs = make_inputs(case)
    model = one_op_model(case, inputs, node_name="layer0_attention")
    for attribute in model.graph.node[0].attribute:
        if attribute.name == "compensation":
            attribute.s = b"vmc+sdc_exact"  # SDC needs pre_softmax
    with pytest.raises(Exception) as error:
        ort_session_factory(model).run(None, feeds(inputs))
    assert "layer0_attention" in str(error.value) and "compensation" in str(error.value)


def test_library_is_found_from_outside_the_source_tree(tmp_path):
    """get_library_path() finds the installed library when the checkout is not on sys.path."""
    import subprocess
    import sys

    script = "import topt_compile, onnxruntime as o; s = o.SessionOptions(); " \
             "s.register_custom_ops_library(topt_compile.get_library_path()); print(topt_compile.get_library_path())"
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.strip().endswith("libtopt_ops.so")
