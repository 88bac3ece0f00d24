"""The tiled prefill kernel (tt_prefill.cu: S > 1, float16, Dh 64/128, no stats; a mask only when
every row is dense) through the CUDA EP against the numpy reference, on fresh random shapes: both
KV layouts, pasts, GQA groups, causal or not, both placements, every compensation, θ from
keep-nothing to keep-all, bool and float masks."""
import numpy as np
import onnxruntime as ort
import pytest

from op_cases import COMPENSATIONS, Case, feeds, make_inputs, one_op_model, reference_outputs

pytestmark = pytest.mark.skipif("CUDAExecutionProvider" not in ort.get_available_providers(),
                                reason="onnxruntime has no CUDAExecutionProvider here (CPU-only build or no GPU)")


def prefill_cases(count: int, seed: int) -> list[Case]:
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(count):
        Hkv = int(rng.choice([1, 2, 3, 4]))
        D = int(rng.choice([64, 128]))
        S = int(rng.choice([2, 17, 64, 65, 130, 300]))
        layout = str(rng.choice(["concat", "shared_buffer"]))
        past = int(rng.choice([0, 0, 5, 100]))
        placement = str(rng.choice(["post_softmax", "pre_softmax"]))
        compensation = str(rng.choice(COMPENSATIONS[placement]))
        P = past if layout == "concat" else past + S + int(rng.integers(0, 9))
        cases.append(Case(B=int(rng.integers(1, 3)), Hq=Hkv * int(rng.choice([1, 3, 4])), Hkv=Hkv, S=S, Skv=S, P=P, Dh=D, Dv=D,
                          dtype="float16", kv_layout=layout, is_causal=int(rng.random() < 0.85), placement=placement,
                          compensation=compensation, k=int(rng.choice([0, 0, 3, 40])),
                          theta_mode=str(rng.choice(["mixed", "mixed", "sparse", "sparse", "keep_none", "keep_all", "minus_inf"])),
                          seed=seed * 1000 + i))
    return cases


def long_prefill_cases(count: int, seed: int) -> list[Case]:
    """Prompts of many key tiles (the 2-stage copy ring, the online max, partial diagonal tiles at
    unaligned pasts), mostly with sparse thresholds so that warps skip P·V in some tiles."""
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(count):
        Hkv, D = int(rng.choice([1, 2])), int(rng.choice([64, 128]))
        S, past = int(rng.choice([333, 640, 1100])), int(rng.choice([0, 37, 200]))
        placement = str(rng.choice(["post_softmax", "pre_softmax"]))
        cases.append(Case(B=1, Hq=Hkv * int(rng.choice([1, 3])), Hkv=Hkv, S=S, Skv=S, P=past + S + int(rng.integers(0, 5)),
                          Dh=D, Dv=D, dtype="float16", kv_layout="shared_buffer", is_causal=int(rng.random() < 0.8),
                          placement=placement, compensation=str(rng.choice(COMPENSATIONS[placement])),
                          k=int(rng.choice([0, 50])), theta_mode=str(rng.choice(["sparse", "sparse", "mixed"])),
                          seed=seed * 1000 + i))
    return cases


def masked_dense_prompt_cases(count: int, seed: int) -> list[Case]:
    """Prompts with a bool or float mask (random, broadcast shapes, a row masked whole) whose rows are
    all dense (dense_prompt): the tiled kernel reads the mask; any other masked prompt is the generic
    kernel's."""
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(count):
        Hkv, D, S = int(rng.choice([1, 2, 3])), int(rng.choice([64, 128])), int(rng.choice([17, 100, 300]))
        past, placement = int(rng.choice([0, 5, 100])), str(rng.choice(["post_softmax", "pre_softmax"]))
        cases.append(Case(B=int(rng.integers(1, 3)), Hq=Hkv * int(rng.choice([1, 3])), Hkv=Hkv, S=S, Skv=S, P=past, Dh=D, Dv=D,
                          dtype="float16", kv_layout="concat",  # op.md: no attn_mask with shared_buffer
                          is_causal=int(rng.random() < 0.5), placement=placement,
                          compensation=str(rng.choice(COMPENSATIONS[placement])), mask=str(rng.choice(["bool", "float"])),
                          fully_masked_row=bool(rng.random() < 0.3), dense_prompt=1, seed=seed * 1000 + i))
    return cases


CASES = [Case(B=1, Hq=9, Hkv=3, S=512, Skv=512, P=600, Dh=64, Dv=64, dtype="float16", kv_layout="shared_buffer",
              is_causal=1, placement="post_softmax", compensation="vmc"),
         Case(B=2, Hq=8, Hkv=2, S=100, Skv=100, P=140, Dh=128, Dv=128, dtype="float16", kv_layout="shared_buffer",
              is_causal=1, placement="pre_softmax", compensation="sdc_exact+vmc", dense_prompt=1),
         # every row dense (dense_prompt, or k >= any row length): post-softmax runs the one-pass kernel
         Case(B=1, Hq=6, Hkv=2, S=300, Skv=300, P=340, Dh=64, Dv=64, dtype="float16", kv_layout="shared_buffer",
              is_causal=1, placement="post_softmax", compensation="vmc", dense_prompt=1, theta_mode="sparse"),
         Case(B=2, Hq=4, Hkv=1, S=150, Skv=150, P=0, Dh=128, Dv=128, dtype="float16", kv_layout="concat",
              is_causal=1, placement="post_softmax", compensation="vmc", k=150, theta_mode="sparse")]
CASES += prefill_cases(40, seed=31) + long_prefill_cases(10, seed=32) + masked_dense_prompt_cases(8, seed=33)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_prefill_kernel_matches_the_reference(topt_library, case):
    inputs = make_inputs(case)
    if case.kv_layout == "shared_buffer" and case.S > 1:  # the first prompt or a chunk after a past
        inputs["past_seqlens"] = np.minimum(inputs["past_seqlens"], case.P - case.S).astype(np.int32)
    expected = reference_outputs(case, inputs)
    outputs = ("Y", "present_key", "present_value")  # no stats: the tiled kernel serves this call
    options = ort.SessionOptions()
    options.register_custom_ops_library(topt_library)
    options.log_severity_level = 3
    session = ort.InferenceSession(one_op_model(case, inputs, outputs).SerializeToString(), options,
                                   providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    y, pk, pv = session.run(list(outputs), feeds(inputs))
    np.testing.assert_allclose(y.astype(np.float64), expected[0].astype(np.float64), atol=3e-3, rtol=3e-3, err_msg=str(case))
    np.testing.assert_array_equal(pk, expected[1], err_msg=f"{case} present_key")
    np.testing.assert_array_equal(pv, expected[2], err_msg=f"{case} present_value")
