"""TopThetaGroupQueryAttention on the CUDA EP against the numpy reference: the cases of
tests/custom_ops/test_gqa_op.py, SmolLM2's shape, and an in-place decode loop (onnxruntime-genai's
binding) whose running V sum must follow the cache."""
from dataclasses import replace

import numpy as np
import onnxruntime as ort
import pytest

from gqa_cases import GqaCase, feeds, gqa_inputs, reference, topt_gqa_model

pytestmark = pytest.mark.skipif("CUDAExecutionProvider" not in ort.get_available_providers(),
                                reason="onnxruntime has no CUDAExecutionProvider here (CPU-only build or no GPU)")

TOL = {"float32": 5e-5, "float16": 3e-3}
CASES = [
    GqaCase(),
    GqaCase(S=1, past=(0, 12), packed=False, seed=1),
    GqaCase(S=7, past=(0, 0), seed=2),
    GqaCase(S=5, past=(4, 11), interleaved=True, seed=3),
    GqaCase(S=3, past=(6, 2), rotary_dim=8, interleaved=True, seed=11),
    GqaCase(S=2, past=(1, 7), positions=True, seed=6),
    GqaCase(B=1, S=1, past=(700,), M=1024, Hq=9, Hkv=3, D=64, rotary_dim=64, dtype="float16", seed=7),  # SmolLM2
    GqaCase(B=4, S=1, past=(300, 5, 0, 511), M=512, Hq=32, Hkv=8, D=128, rotary_dim=128, dtype="float16", seed=8),
    GqaCase(B=1, S=1, past=(900,), M=1024, Hq=9, Hkv=3, D=64, rotary_dim=64, placement="pre_softmax",
            compensation="sdc_exact+vmc", seed=9),
    GqaCase(B=2, S=40, past=(0, 0), M=64, Hq=9, Hkv=3, D=64, rotary_dim=64, dtype="float16", seed=10),
    # long rows, many splits per KV head: claimed warp tiles, the split kernel's K loads before its wait
    GqaCase(B=3, S=1, past=(2000, 17, 4000), M=4096, Hq=9, Hkv=3, D=64, rotary_dim=64, dtype="float16",
            placement="pre_softmax", compensation="sdc_exact+vmc", k=64, seed=13),
    GqaCase(B=2, S=1, past=(3001, 1500), M=4096, Hq=32, Hkv=8, D=128, rotary_dim=128, dtype="float16",
            placement="pre_softmax", compensation="sdc_exact+vmc", k=64, seed=14),
]


def _session(model, library):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.register_custom_ops_library(library)
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CUDAExecutionProvider", "CPUExecutionProvider"])


@pytest.mark.parametrize("case", CASES, ids=str)
def test_cuda_matches_the_reference(topt_library, case):
    inputs = gqa_inputs(case)
    expected = reference(case, inputs)
    outputs = ("output", "present_key", "present_value", "present_v_sum", "stats")
    got = _session(topt_gqa_model(case, inputs, outputs), topt_library).run(None, feeds(inputs))
    tol = TOL[case.dtype]
    for i, name in enumerate(outputs):
        if name == "stats":
            np.testing.assert_array_equal(got[i], expected[i], err_msg=f"{case} {name}")
        elif name == "present_v_sum":
            np.testing.assert_allclose(got[i], expected[i], rtol=1e-4, atol=1e-3, err_msg=f"{case} {name}")
        else:
            np.testing.assert_allclose(got[i].astype(np.float64), expected[i].astype(np.float64), atol=tol, rtol=tol,
                                       err_msg=f"{case} {name}")


@pytest.mark.parametrize("placement", ["pre_softmax", "post_softmax"])
def test_one_node_called_again_on_long_rows_matches_the_reference_every_time(topt_library, placement):
    """The split kernel's counters (claimed tiles, arrivals) live in the node's scratch between calls:
    each call must start from zero whatever the rows before it were."""
    case = GqaCase(B=2, S=1, past=(3000, 2500), M=4096, Hq=9, Hkv=3, D=64, rotary_dim=64, dtype="float16",
                   placement=placement, compensation="sdc_exact+vmc" if placement == "pre_softmax" else "vmc", k=64)
    session = _session(topt_gqa_model(case, gqa_inputs(case), ("output", "stats")), topt_library)
    for t, past in enumerate([(3000, 2500), (3037, 2399), (40, 4000), (4090, 3), (3000, 2500)]):
        step = replace(case, past=past, seed=100 + t)
        inputs = gqa_inputs(step)
        expected = reference(step, inputs)
        got = session.run(None, feeds(inputs))
        np.testing.assert_allclose(got[0].astype(np.float64), expected[0].astype(np.float64),
                                   atol=TOL["float16"], rtol=TOL["float16"], err_msg=f"call {t}, past {past}")
        np.testing.assert_array_equal(got[1], expected[4], err_msg=f"call {t}, past {past}: stats")


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_in_place_decode_loop_matches_the_reference_at_every_step(topt_library, dtype):
    """Prefill, decode, a rewind, a new prompt in the same buffers: present bound to past on the device."""
    case = GqaCase(B=2, S=1, past=(0, 0), M=96, Hq=9, Hkv=3, D=64, rotary_dim=64, dtype=dtype, seed=12)
    session = _session(topt_gqa_model(case, gqa_inputs(case)), topt_library)
    rng = np.random.default_rng(3)
    cache = {n: np.zeros((case.B, case.Hkv, case.M, case.D), dtype) for n in ("past_key", "past_value")}
    device = {n: ort.OrtValue.ortvalue_from_numpy(a, "cuda", 0) for n, a in cache.items()}
    plan = [((0, 0), 20)] + [((t, t), 1) for t in range(20, 40)] + [((40, 33), 1)] + \
           [((t, t - 7), 1) for t in range(41, 45)] + [((0, 0), 20)] + [((t, t), 1) for t in range(20, 26)]
    for past, S in plan:
        step = replace(case, S=S, past=past, seed=int(rng.integers(1 << 30)))
        inputs = {**gqa_inputs(step), **cache}
        expected = reference(step, inputs)
        binding = session.io_binding()
        for name, value in feeds(inputs).items():
            if name in device:
                binding.bind_ortvalue_input(name, device[name])
            else:
                binding.bind_cpu_input(name, value)
        binding.bind_output("output", "cuda", 0)
        binding.bind_ortvalue_output("present_key", device["past_key"])
        binding.bind_ortvalue_output("present_value", device["past_value"])
        session.run_with_iobinding(binding)
        tol = TOL[dtype]
        np.testing.assert_allclose(binding.get_outputs()[0].numpy().astype(np.float64), expected[0].astype(np.float64),
                                   atol=tol, rtol=tol, err_msg=f"past {past}, S {S}")
        cache = {"past_key": expected[1], "past_value": expected[2]}
    np.testing.assert_allclose(device["past_key"].numpy().astype(np.float64), cache["past_key"].astype(np.float64),
                               atol=TOL[dtype], rtol=TOL[dtype])
    np.testing.assert_array_equal(device["past_value"].numpy(), cache["past_value"])
