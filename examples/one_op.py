"""Run one TopThetaAttention node in ONNX Runtime with the topt library, next to the numpy reference.

A decode step of a SmolLM2-shaped attention (9 query / 3 KV heads, head dim 64) over a 2048-token
cache, with post-softmax thresholds set to keep about k = 32 keys per row, and the dense result for
comparison. Usage: python examples/one_op.py
"""
import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import topt_compile
from topt_compile.ops import schema
from topt_compile.ops.reference import top_theta_attention

B, Hq, Hkv, D, P, K_KEEP = 1, 9, 3, 64, 2048, 32
rng = np.random.default_rng(0)
# Keys with a few strong directions, so that attention is peaked as in trained models.
q = rng.standard_normal((B, Hq, 1, D)).astype(np.float32) * 2
past_k = rng.standard_normal((B, Hkv, P, D)).astype(np.float32)
past_k[:, :, rng.choice(P, 64, replace=False)] += q[:, ::3, 0][:, :, None, :] * 0.5
past_v, k, v = (rng.standard_normal(s).astype(np.float32) for s in [(B, Hkv, P, D), (B, Hkv, 1, D), (B, Hkv, 1, D)])

# A probability threshold per head that keeps about K_KEEP keys of these rows (what calibration does).
scores = np.einsum("bhd,bhtd->bht", q[:, :, 0], np.repeat(np.concatenate([past_k, k], 2), Hq // Hkv, 1)) / np.sqrt(D)
probs = np.exp(scores - scores.max(-1, keepdims=True))
probs /= probs.sum(-1, keepdims=True)
thresholds = np.sort(probs[0], axis=-1)[:, -(K_KEEP + 1)][:, None].astype(np.float32)
lengths = np.array([0], dtype=np.int64)

inputs = {"Q": q, "K": k, "V": v, "past_key": past_k, "past_value": past_v}
node = schema.make_node({**{n: n for n in inputs}, "thresholds": "theta", "threshold_lengths": "theta_lengths"},
                        {"Y": "Y", "stats": "stats"}, schema.Attributes(is_causal=1, k=K_KEEP), name="attention")
graph = helper.make_graph(
    [node], "one_op", [helper.make_tensor_value_info(n, TensorProto.FLOAT, a.shape) for n, a in inputs.items()],
    [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None), helper.make_tensor_value_info("stats", TensorProto.INT64, None)],
    initializer=[numpy_helper.from_array(thresholds, "theta"), numpy_helper.from_array(lengths, "theta_lengths")])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), schema.opset_import()])

options = ort.SessionOptions()
options.register_custom_ops_library(topt_compile.get_library_path())
y, stats = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, inputs)

y_ref, *_, stats_ref = top_theta_attention(q, k, v, None, past_k, past_v, thresholds, lengths, is_causal=1, k=K_KEEP)
y_dense = top_theta_attention(q, k, v, None, past_k, past_v, np.full_like(thresholds, -np.inf), lengths, is_causal=1)[0]
kept = stats[0, :, 2] / stats[0, :, 1]
union = stats[0, ::Hq // Hkv, 5] / (P + 1)
print(f"library: {topt_compile.get_library_path()}")
print(f"kept fraction per head:    {np.array2string(kept, precision=3)}")
print(f"V rows read per KV group:  {np.array2string(union, precision=3)} (union over the group's heads)")
print(f"max |Y - reference|:       {np.abs(y - y_ref).max():.2e}")
print(f"stats equal the reference: {bool((stats == stats_ref).all())}")
print(f"relative error vs dense:   {np.linalg.norm(y - y_dense) / np.linalg.norm(y_dense):.3f} (post-softmax + VMC)")
