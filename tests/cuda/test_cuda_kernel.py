"""The CUDA kernel (ONNX Runtime's CUDA EP + the topt library) against the numpy reference.

Skips, with its reason, where onnxruntime has no CUDA EP or no GPU is visible; the runs on the
GPU machine are committed under bench/results/ (cuda_tests.txt).
"""
from dataclasses import replace

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from op_cases import Case, covering_cases, feeds, make_inputs, one_op_model, reference_outputs, sampled_cases
from topt_compile.ops.schema import OUTPUTS

pytestmark = pytest.mark.skipif("CUDAExecutionProvider" not in ort.get_available_providers(),
                                reason="onnxruntime has no CUDAExecutionProvider here (CPU-only build or no GPU)")

SHAPES = [  # decode- and prefill-like shapes on top of the random grid
    Case(B=1, Hq=32, Hkv=8, S=1, Skv=1, P=4096, Dh=128, Dv=128, dtype="float16", kv_layout="shared_buffer",
         placement="pre_softmax", compensation="sdc_exact+vmc", with_past_v_sum=True),
    Case(B=3, Hq=9, Hkv=3, S=1, Skv=1, P=2000, Dh=64, Dv=64, dtype="float16", kv_layout="shared_buffer",
         placement="post_softmax", compensation="vmc", with_past_v_sum=True),
    Case(B=2, Hq=8, Hkv=2, S=1, Skv=1, P=777, Dh=80, Dv=80, kv_layout="concat", mask="bool"),
    Case(B=1, Hq=9, Hkv=3, S=130, Skv=130, P=0, Dh=64, Dv=64, dtype="float16", is_causal=1,
         placement="post_softmax", compensation="vmc"),
    Case(B=2, Hq=4, Hkv=4, S=70, Skv=70, P=33, Dh=128, Dv=128, is_causal=1, mask="float",
         placement="pre_softmax", compensation="sdc_exact+vmc"),
    # large batches: few KV splits per (row, KV head)
    Case(B=24, Hq=9, Hkv=3, S=1, Skv=1, P=4096, Dh=64, Dv=64, dtype="float16", kv_layout="shared_buffer",
         placement="pre_softmax", compensation="sdc_exact+vmc"),
    Case(B=16, Hq=32, Hkv=8, S=1, Skv=1, P=3000, Dh=128, Dv=128, dtype="float16", kv_layout="shared_buffer",
         placement="pre_softmax", compensation="sdc_exact+vmc", with_past_v_sum=True),
    # B = 1, long rows: more than 32 KV splits per KV head (the 512-thread merge), and more than 256
    # (one KV head: the merge's threads take a second split's record each)
    Case(B=1, Hq=32, Hkv=8, S=1, Skv=1, P=8192, Dh=128, Dv=128, dtype="float16", kv_layout="shared_buffer",
         placement="pre_softmax", compensation="sdc_exact+vmc", with_past_v_sum=True),
    Case(B=1, Hq=9, Hkv=3, S=1, Skv=1, P=8192, Dh=64, Dv=64, dtype="float16", kv_layout="shared_buffer",
         placement="post_softmax", compensation="vmc"),
    Case(B=1, Hq=4, Hkv=1, S=1, Skv=1, P=60000, Dh=128, Dv=128, dtype="float16", kv_layout="shared_buffer",
         placement="pre_softmax", compensation="sdc_exact+vmc"),
    # the wide split kernel (8 warps, one CTA per SM; pre_softmax without a mask where a KV head gets
    # many splits): Dh 64's 256-key tiles (a tile row is one byte in the kept lists), uneven rows
    Case(B=1, Hq=9, Hkv=3, S=1, Skv=1, P=8192, Dh=64, Dv=64, dtype="float16", kv_layout="shared_buffer",
         placement="pre_softmax", compensation="sdc_exact+vmc", with_past_v_sum=True),
    Case(B=2, Hq=12, Hkv=2, S=1, Skv=1, P=5001, Dh=128, Dv=128, dtype="float16", kv_layout="shared_buffer",
         placement="pre_softmax", compensation="sdc_exact"),
]
CASES = SHAPES + [replace(c, seed=c.seed + 7) for c in covering_cases()] + sampled_cases(120, seed=21)
# fp32 kernels accumulate in another order than the float64 reference; fp16 outputs round once.
Y_TOLERANCE = {"float32": 5e-5, "float16": 3e-3}


@pytest.fixture(scope="module")
def cuda_session(topt_library):
    def make(model):
        options = ort.SessionOptions()
        options.register_custom_ops_library(topt_library)
        options.log_severity_level = 3
        session = ort.InferenceSession(model.SerializeToString(), options,
                                       providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
        return session
    return make


@pytest.mark.parametrize("case", CASES, ids=str)
def test_cuda_kernel_matches_reference(cuda_session, case):
    inputs = make_inputs(case)
    expected = reference_outputs(case, inputs)
    got = cuda_session(one_op_model(case, inputs)).run(list(OUTPUTS), feeds(inputs))
    assert_outputs_match(case, got, expected)


def assert_outputs_match(case, got, expected):
    """Y within the dtype's tolerance, present_v_sum within float32 summation error, the rest exact."""
    for name, g, e in zip(OUTPUTS, got, expected):
        if name == "Y":
            tol = Y_TOLERANCE[case.dtype]
            np.testing.assert_allclose(g.astype(np.float64), e.astype(np.float64), atol=tol, rtol=tol,
                                       equal_nan=True, err_msg=f"{case} Y")
        elif name == "present_v_sum":
            np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-3, err_msg=f"{case} {name}")
        else:
            np.testing.assert_array_equal(g, e, err_msg=f"{case} {name}")


def test_the_node_runs_on_the_cuda_ep(topt_library):
    """The op is placed on the CUDA EP (not silently on the CPU fallback)."""
    case = SHAPES[0]
    inputs = make_inputs(case)
    options = ort.SessionOptions()
    options.register_custom_ops_library(topt_library)
    options.enable_profiling = True
    session = ort.InferenceSession(one_op_model(case, inputs).SerializeToString(), options,
                                   providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    session.run(None, feeds(inputs))
    import json
    events = json.load(open(session.end_profiling()))
    providers = {e["args"].get("provider") for e in events if e.get("name", "").startswith("tta")}
    assert providers == {"CUDAExecutionProvider"}, providers


@pytest.mark.parametrize("columns", [40, 507, 512, 513, 600, 1500])
@pytest.mark.parametrize("placement,compensation", [("post_softmax", "vmc"), ("pre_softmax", "sdc_exact+vmc")])
def test_decode_with_a_long_calibrated_table_picks_each_rows_column(cuda_session, columns, placement, compensation):
    # Calibrated tables have hundreds of length columns (SmolLM2 at 8K: 507); the decode split kernel
    # reads a table of up to 512 columns in one round (4 columns per thread), a longer one by a
    # warp-wide search of 2–3 rounds: 507/512/513 sit at that edge. Rows of different lengths
    # (past_seqlens per batch row) must land on the reference's column: the kept counts in stats are
    # compared exactly.
    case = Case(B=4, Hq=9, Hkv=3, S=1, Skv=1, P=2000, Dh=64, Dv=64, dtype="float16", kv_layout="shared_buffer",
                placement=placement, compensation=compensation, with_past_v_sum=True, seed=100 + columns)
    inputs = make_inputs(case)
    rng = np.random.default_rng(columns)
    lengths = np.sort(rng.choice(case.P + 2, columns, replace=False)).astype(np.int64)
    inputs["threshold_lengths"] = lengths
    if placement == "post_softmax":  # around 1/n for each column, with a different draw per column
        inputs["thresholds"] = (rng.uniform(0.3, 3.0, (case.Hq, columns)) / (np.maximum(lengths, 1) + 4)).astype(np.float32)
    else:
        inputs["thresholds"] = rng.uniform(-0.5, 2.5, (case.Hq, columns)).astype(np.float32)
    expected = reference_outputs(case, inputs)
    got = cuda_session(one_op_model(case, inputs)).run(list(OUTPUTS), feeds(inputs))
    assert_outputs_match(case, got, expected)


@pytest.mark.parametrize("heads", [(9, 3), (6, 2), (8, 2)])
@pytest.mark.parametrize("ramp", ["rising", "falling"])
def test_decode_keeps_exact_sums_while_scores_climb_along_the_row(cuda_session, heads, ramp):
    # pre_softmax decode keeps one reference per head and rescales its sums only when a tile's
    # score passes it by more than a margin. Scores that climb along the row (rising: the
    # reference moves many times; falling: never after the first tile) must give the reference's
    # Y. 9/3 and 6/2 run the kernel's 3-head instance, 8/2 the 4-head one.
    hq, hkv = heads
    case = Case(B=3, Hq=hq, Hkv=hkv, S=1, Skv=1, P=3000, Dh=64, Dv=64, dtype="float16", kv_layout="shared_buffer",
                placement="pre_softmax", compensation="sdc_exact+vmc", with_past_v_sum=True, seed=hq * 10 + len(ramp))
    inputs = make_inputs(case)
    q = inputs["Q"].astype(np.float32)[:, :, 0]  # [B, Hq, D]
    direction = q.reshape(case.B, hkv, hq // hkv, case.Dh).mean(axis=2)  # the group's mean query
    direction /= np.linalg.norm(direction, axis=-1, keepdims=True)
    # shift each visible past key along the group's mean query so that the scaled score of a
    # typical head climbs by ~30 over the row: far past the reference's margin, many times
    norm = np.linalg.norm(q, axis=-1).mean()
    k = inputs["past_key"].astype(np.float32)
    for b, length in enumerate(inputs["past_seqlens"]):
        steps = np.linspace(0.0, 30.0, length, dtype=np.float32)
        steps = steps if ramp == "rising" else steps[::-1]
        k[b, :, :length] += direction[b, :, None, :] * (steps[None, :, None] * 8.0 / norm)
    inputs["past_key"] = k.astype(np.float16)
    inputs["thresholds"] = np.full_like(inputs["thresholds"], 20.0)  # keeps the top of the climb
    expected = reference_outputs(case, inputs)
    got = cuda_session(one_op_model(case, inputs)).run(list(OUTPUTS), feeds(inputs))
    assert_outputs_match(case, got, expected)


@pytest.mark.parametrize("heads", [(32, 8, 128), (9, 3, 64)])
def test_decode_reads_the_cache_the_kernel_before_wrote(cuda_session, heads):
    # The decode split kernel prefetches its first K tiles into L2 before its PDL wait on the kernel
    # before. Here a Neg node writes the caches right before the attention node, and a second run
    # with other values rewrites the same buffers: each run's Y must be its own caches' (B = 1: the
    # wide split kernel, no GQA front).
    hq, hkv, d = heads
    case = Case(B=1, Hq=hq, Hkv=hkv, S=1, Skv=1, P=6000, Dh=d, Dv=d, dtype="float16", kv_layout="shared_buffer",
                placement="pre_softmax", compensation="sdc_exact+vmc", with_past_v_sum=True, seed=hq)
    inputs = make_inputs(case)
    model = one_op_model(case, inputs)
    cache_names = ("past_key", "past_value")
    for graph_input in model.graph.input:
        if graph_input.name in cache_names:
            graph_input.name = f"negated_{graph_input.name}"
    negations = [onnx.helper.make_node("Neg", [f"negated_{n}"], [n], name=f"neg_{n}") for n in cache_names]
    model.graph.node.insert(0, negations[1])
    model.graph.node.insert(0, negations[0])
    session = cuda_session(model)
    for seed in (1, 2):
        rng = np.random.default_rng(seed)
        for n in cache_names:
            inputs[n] = rng.standard_normal(inputs[n].shape).astype(np.float16)
        run_feeds = {(f"negated_{n}" if n in cache_names else n): (-a if n in cache_names else a)
                     for n, a in feeds(inputs).items()}
        got = session.run(list(OUTPUTS), run_feeds)
        assert_outputs_match(case, got, reference_outputs(case, inputs))
