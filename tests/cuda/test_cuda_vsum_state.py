"""The CUDA op's running V sum: a decode loop over an in-place cache (present bound to past, as
onnxruntime-genai runs it) with no past_v_sum input gives, at every step, what the numpy
reference gives from the whole cache — through prefills, rewinds, per-row lengths and a new
sequence in the same buffers (the cases where a kept sum would be stale). Both placements, and
batches that give each (row, KV head) many KV splits or only a few.
"""
import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from topt_compile.ops import schema
from topt_compile.ops.reference import top_theta_attention

pytestmark = pytest.mark.skipif("CUDAExecutionProvider" not in ort.get_available_providers(),
                                reason="onnxruntime has no CUDAExecutionProvider here (CPU-only build or no GPU)")

B, HQ, HKV, D, M = 2, 9, 3, 64, 160
LENGTHS = np.array([0, 16, 64], np.int64)
COMPENSATION = {"post_softmax": "vmc", "pre_softmax": "sdc_exact+vmc"}
TOL = {"float32": 5e-5, "float16": 3e-3}


def attributes(placement: str) -> dict:
    return dict(is_causal=1, k=4, placement=placement, compensation=COMPENSATION[placement], kv_layout="shared_buffer")


def model(dtype: str, placement: str = "post_softmax"):
    """One TopThetaAttention node; thresholds are an input so a step can move them off near-ties."""
    elem = TensorProto.FLOAT if dtype == "float32" else TensorProto.FLOAT16
    names = {"Q": "Q", "K": "K", "V": "V", "past_key": "past_key", "past_value": "past_value",
             "thresholds": "thresholds", "threshold_lengths": "threshold_lengths", "past_seqlens": "past_seqlens"}
    outputs = ("Y", "present_key", "present_value")
    node = schema.make_node(names, {o: o for o in outputs}, schema.Attributes(**attributes(placement)), name="tta")
    inputs = [helper.make_tensor_value_info(n, elem, None) for n in ("Q", "K", "V", "past_key", "past_value")]
    inputs += [helper.make_tensor_value_info("thresholds", TensorProto.FLOAT, None),
               helper.make_tensor_value_info("past_seqlens", TensorProto.INT32, None)]
    graph = helper.make_graph([node], "vsum_state", inputs, [helper.make_tensor_value_info(o, elem, None) for o in outputs],
                              initializer=[numpy_helper.from_array(LENGTHS, "threshold_lengths")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), schema.opset_import()], ir_version=10)


class Loop:
    """The device cache, bound in place, and its host mirror the reference reads."""

    def __init__(self, session, dtype, rng, m=M, batch=B, placement="post_softmax"):
        self.session, self.dtype, self.rng, self.batch = session, np.dtype(dtype), rng, batch
        self.attributes = attributes(placement)
        self.cache = {n: rng.standard_normal((batch, HKV, m, D)).astype(self.dtype) for n in ("past_key", "past_value")}
        self.device = {n: ort.OrtValue.ortvalue_from_numpy(a, "cuda", 0) for n, a in self.cache.items()}
        if placement == "post_softmax":  # probabilities around a few times 1/n
            self.thresholds = (rng.uniform(0.3, 3.0, (HQ, len(LENGTHS))) / np.array([20, 40, 100])).astype(np.float32)
        else:  # scores (the queries are 1.5× normal: scaled scores spread over about ±3)
            self.thresholds = rng.uniform(0.5, 2.5, (HQ, len(LENGTHS))).astype(np.float32)

    def call(self, past: list[int], S: int, label: str):
        normal = lambda *shape: self.rng.standard_normal(shape).astype(self.dtype)  # noqa: E731
        B = self.batch
        inputs = {"Q": normal(B, HQ, S, D) * self.dtype.type(1.5), "K": normal(B, HKV, S, D), "V": normal(B, HKV, S, D),
                  **self.cache, "past_seqlens": np.asarray(past, np.int32)}
        for _ in range(20):  # θ away from near-ties, so float32 and float64 decide alike
            (y, present_k, present_v, _, _), margin = top_theta_attention(
                **inputs, thresholds=self.thresholds, threshold_lengths=LENGTHS, **self.attributes, return_decision_margin=True)
            if margin > 4e-6:
                break
            self.thresholds = (self.thresholds * np.float32(1.003) + np.float32(1e-4)).astype(np.float32)
        binding = self.session.io_binding()
        for name in ("Q", "K", "V", "past_seqlens"):
            binding.bind_cpu_input(name, inputs[name])
        binding.bind_cpu_input("thresholds", self.thresholds)
        for name, value in self.device.items():
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("Y", "cuda", 0)
        binding.bind_ortvalue_output("present_key", self.device["past_key"])
        binding.bind_ortvalue_output("present_value", self.device["past_value"])
        self.session.run_with_iobinding(binding)
        got = binding.get_outputs()[0].numpy()
        tol = TOL[self.dtype.name]
        np.testing.assert_allclose(got.astype(np.float64), y.astype(np.float64), atol=tol, rtol=tol, err_msg=label)
        self.cache = {"past_key": present_k, "past_value": present_v}


@pytest.mark.parametrize("placement", ["post_softmax", "pre_softmax"])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_running_v_sum_follows_the_cache(topt_library, dtype, placement):
    options = ort.SessionOptions()
    options.register_custom_ops_library(topt_library)
    options.log_severity_level = 3
    session = ort.InferenceSession(model(dtype, placement).SerializeToString(), options,
                                   providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    loop = Loop(session, dtype, np.random.default_rng(17), placement=placement)
    loop.call([0, 0], 40, "prefill 40")
    for t in range(40, 70):
        loop.call([t, t], 1, f"decode at {t}")
    loop.call([70, 66], 1, "row 1 rewound to 66")  # its kept sum covers rows it no longer has
    for t in range(71, 75):
        loop.call([t, t - 4], 1, f"decode at {t} / {t - 4}")
    loop.call([0, 0], 40, "a new sequence: prefill 40 again")  # same lengths as before, new rows
    for t in range(40, 46):
        loop.call([t, t], 1, f"new sequence, decode at {t}")
    loop.call([0, 0], 1, "a one-token prompt")  # no prefill call: the state of length 1 is this call's
    for t in range(1, 6):
        loop.call([t, t], 1, f"one-token prompt, decode at {t}")
    for name in ("past_key", "past_value"):
        np.testing.assert_array_equal(loop.device[name].numpy(), loop.cache[name], err_msg=name)


@pytest.mark.parametrize("placement,batch", [("post_softmax", 2), ("pre_softmax", 2), ("pre_softmax", 32)])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_a_stale_sum_over_a_long_cache_is_rebuilt_from_every_split(topt_library, dtype, placement, batch):
    """Decoding starts on a cache filled without a prompt call (the sum was never kept): the first
    step sums thousands of past rows across the KV splits, the next ones reuse the kept sum. At
    batch 32 each (row, KV head) gets a few splits only."""
    options = ort.SessionOptions()
    options.register_custom_ops_library(topt_library)
    options.log_severity_level = 3
    session = ort.InferenceSession(model(dtype, placement).SerializeToString(), options,
                                   providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    loop = Loop(session, dtype, np.random.default_rng(23), m=4096, batch=batch, placement=placement)
    for t in range(3000, 3004):
        loop.call([t - (i % 2) * 1777 - (i // 2) * 61 for i in range(batch)], 1, f"decode at {t}")
