"""Decode-step attention on the GPU, side by side in one run: topt's TopThetaAttention (CUDA EP,
in-place KV cache) against ONNX Runtime's dense com.microsoft.GroupQueryAttention (past and present
bound to one buffer: its fastest form), ONNX Attention-23 (past -> present copy), and torch SDPA.

Method: every ORT model is a chain of N attention nodes, each with its own KV
cache (so no layer's cache sits in L2 for the next), bound with I/O binding to device buffers made
by torch. The time per node is the slope between N1 and N2 nodes, (t(N2) - t(N1)) / (N2 - N1),
which removes the fixed per-run cost of ORT's Python API. Medians of many runs. torch SDPA is
timed as a CUDA graph of N2 layers. Inputs are random normal (never zeros). Thresholds are set to
hit a target union kept fraction (V rows read per KV group), found by bisection with the op's own
stats output; the measured fraction is reported.

--cuda-graph runs every ORT session with enable_cuda_graph (a run replays one captured graph), so
the slope is GPU time per node, as torch SDPA's; without it a small node also pays ORT's per-node
host cost.
--kernels also profiles each topt configuration (torch.profiler/CUPTI): µs per node of each kernel.
--rounds R also times each topt configuration against torch SDPA and ORT GQA in R paired rounds
(bench/paired.py): single runs of each, interleaved, every one as a slope between N1 and N2 layers
(SDPA's a CUDA graph of each length: its fixed cost too is removed, unlike the N2-only SDPA time
above); the median per-round ratio and its quartiles ("paired_ratio_vs_sdpa", "..._vs_gqa").

Usage (GPU machine, onnxruntime-gpu + torch): python bench/decode_attention.py --out results.json
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, __file__.rsplit("/bench/", 1)[0])
import topt_compile  # noqa: E402
from paired import paired_rounds  # noqa: E402  (bench/ is on sys.path when run as a script)
from topt_compile.ops import schema  # noqa: E402

F16 = TensorProto.FLOAT16
TORCH_TO_NP = {torch.float16: np.float16, torch.float32: np.float32, torch.int32: np.int32, torch.int64: np.int64}


def value_info(name, elem, shape):
    return helper.make_tensor_value_info(name, elem, shape)


def topt_model(n_layers, B, Hq, Hkv, D, M, placement, compensation, with_stats=False):
    """N chained TopThetaAttention nodes, shared_buffer layout, thresholds as a graph input."""
    nodes, inputs, outputs = [], [], []
    inputs += [value_info("q", F16, [B, Hq, 1, D]), value_info("k_new", F16, [B, Hkv, 1, D]),
               value_info("v_new", F16, [B, Hkv, 1, D]), value_info("theta", TensorProto.FLOAT, [Hq, 1]),
               value_info("past_seqlens", TensorProto.INT32, [B])]
    q = "q"
    for layer in range(n_layers):
        pk, pv, vs = f"past_key_{layer}", f"past_value_{layer}", f"past_v_sum_{layer}"
        inputs += [value_info(pk, F16, [B, Hkv, M, D]), value_info(pv, F16, [B, Hkv, M, D]),
                   value_info(vs, TensorProto.FLOAT, [B, Hkv, D])]
        y = f"y_{layer}"
        outs = {"Y": y, "present_key": f"present_key_{layer}", "present_value": f"present_value_{layer}",
                "present_v_sum": f"present_v_sum_{layer}"}
        if with_stats:
            outs["stats"] = f"stats_{layer}"
        nodes.append(schema.make_node(
            {"Q": q, "K": "k_new", "V": "v_new", "past_key": pk, "past_value": pv, "thresholds": "theta",
             "threshold_lengths": "theta_lengths", "past_seqlens": "past_seqlens", "past_v_sum": vs},
            outs, schema.Attributes(is_causal=1, placement=placement, compensation=compensation,
                                    kv_layout="shared_buffer"), name=f"layer{layer}"))
        outputs += [value_info(outs["present_key"], F16, [B, Hkv, M, D]), value_info(outs["present_value"], F16, [B, Hkv, M, D]),
                    value_info(outs["present_v_sum"], TensorProto.FLOAT, [B, Hkv, D])]
        if with_stats:
            outputs.append(value_info(outs["stats"], TensorProto.INT64, [B, Hq, 6]))
        q = y
    outputs.insert(0, value_info(q, F16, [B, Hq, 1, D]))
    graph = helper.make_graph(nodes, "topt_decode", inputs, outputs,
                              initializer=[numpy_helper.from_array(np.array([0], np.int64), "theta_lengths")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), schema.opset_import()], ir_version=10)


def gqa_model(n_layers, B, Hq, Hkv, D, M):
    """N chained com.microsoft.GroupQueryAttention nodes; past and present share one buffer."""
    nodes, inputs, outputs = [], [], []
    inputs += [value_info("q", F16, [B, 1, Hq * D]), value_info("k_new", F16, [B, 1, Hkv * D]),
               value_info("v_new", F16, [B, 1, Hkv * D]), value_info("seqlens_k", TensorProto.INT32, [B]),
               value_info("total_sequence_length", TensorProto.INT32, [])]
    q = "q"
    for layer in range(n_layers):
        pk, pv = f"past_key_{layer}", f"past_value_{layer}"
        inputs += [value_info(pk, F16, [B, Hkv, M, D]), value_info(pv, F16, [B, Hkv, M, D])]
        y = f"y_{layer}"
        nodes.append(helper.make_node(
            "GroupQueryAttention", [q, "k_new", "v_new", pk, pv, "seqlens_k", "total_sequence_length"],
            [y, f"present_key_{layer}", f"present_value_{layer}"], domain="com.microsoft",
            num_heads=Hq, kv_num_heads=Hkv, scale=1.0 / math.sqrt(D), name=f"layer{layer}"))
        outputs += [value_info(f"present_key_{layer}", F16, [B, Hkv, M, D]),
                    value_info(f"present_value_{layer}", F16, [B, Hkv, M, D])]
        q = y
    outputs.insert(0, value_info(q, F16, [B, 1, Hq * D]))
    graph = helper.make_graph(nodes, "gqa_decode", inputs, outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)],
                             ir_version=10)


def attention23_model(n_layers, B, Hq, Hkv, D, P):
    """N chained ONNX Attention-23 nodes: present = past ++ new, a full cache copy each step."""
    nodes, inputs, outputs = [], [], []
    inputs += [value_info("q", F16, [B, Hq, 1, D]), value_info("k_new", F16, [B, Hkv, 1, D]),
               value_info("v_new", F16, [B, Hkv, 1, D])]
    q = "q"
    for layer in range(n_layers):
        pk, pv = f"past_key_{layer}", f"past_value_{layer}"
        inputs += [value_info(pk, F16, [B, Hkv, P, D]), value_info(pv, F16, [B, Hkv, P, D])]
        y = f"y_{layer}"
        nodes.append(helper.make_node("Attention", [q, "k_new", "v_new", "", pk, pv],
                                      [y, f"present_key_{layer}", f"present_value_{layer}"], name=f"layer{layer}"))
        outputs += [value_info(f"present_key_{layer}", F16, [B, Hkv, P + 1, D]),
                    value_info(f"present_value_{layer}", F16, [B, Hkv, P + 1, D])]
        q = y
    outputs.insert(0, value_info(q, F16, [B, Hq, 1, D]))
    graph = helper.make_graph(nodes, "attention23_decode", inputs, outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)], ir_version=11)


CUDA_GRAPH = False  # --cuda-graph: ORT captures each session's run once and replays it (no per-node host cost)


class Runner:
    """A session plus an I/O binding of torch device tensors (inputs and preallocated outputs)."""

    def __init__(self, model: onnx.ModelProto, feeds: dict, outputs: dict, cpu_inputs=()):
        options = ort.SessionOptions()
        options.register_custom_ops_library(topt_compile.get_library_path())
        options.log_severity_level = 3
        cuda = {"device_id": 0} | ({"enable_cuda_graph": "1"} if CUDA_GRAPH else {})
        self.session = ort.InferenceSession(model.SerializeToString(), options,
                                            providers=[("CUDAExecutionProvider", cuda), "CPUExecutionProvider"])
        self.binding = self.session.io_binding()
        self.keep = []
        for name, tensor in feeds.items():
            self._bind(self.binding.bind_input, name, tensor, name in cpu_inputs)
        for name, tensor in outputs.items():
            self._bind(self.binding.bind_output, name, tensor, False)

    def _bind(self, bind, name, tensor, on_cpu):
        tensor = tensor.contiguous()
        self.keep.append(tensor)
        device = "cpu" if on_cpu else "cuda"
        bind(name, device, 0, TORCH_TO_NP[tensor.dtype], list(tensor.shape), tensor.data_ptr())

    def run(self):
        self.session.run_with_iobinding(self.binding)

    def time(self, repeats):
        for _ in range(5):
            self.run()
        times = []
        for _ in range(repeats):
            torch.cuda.synchronize()
            start = time.perf_counter()
            self.run()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return statistics.median(times)


def slope_ms(make_runner, n1, n2, repeats):
    t1, t2 = make_runner(n1).time(repeats), make_runner(n2).time(repeats)
    return (t2 - t1) / (n2 - n1) * 1e3


def sdpa_ms(B, Hq, Hkv, D, T, n_layers, repeats):
    q = torch.randn(B, Hq, 1, D, device="cuda", dtype=torch.float16)
    caches = [(torch.randn(B, Hkv, T, D, device="cuda", dtype=torch.float16),
               torch.randn(B, Hkv, T, D, device="cuda", dtype=torch.float16)) for _ in range(n_layers)]
    graph = SdpaGraph(q, caches)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    del caches, graph
    return statistics.median(times) / n_layers


class SdpaGraph:
    """torch SDPA over the given layers' caches (enable_gqa), one CUDA graph; run() replays it."""

    def __init__(self, q, caches):
        self.q, self.caches = q, caches
        for _ in range(3):
            self.step()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.step()

    def step(self):
        x = self.q
        for k, v in self.caches:
            x = torch.nn.functional.scaled_dot_product_attention(x, k, v, enable_gqa=True)
        return x

    def run(self):
        self.graph.replay()


def decode_inputs(B, Hq, Hkv, D, ctx, n_layers, device="cuda"):
    """One decode step's inputs, random normal: q, k_new, v_new, seqlens (= ctx), and per layer a KV
    cache of ctx + 1 rows (in place: the new row goes at ctx), its V sum over the ctx past rows and
    a present_v_sum buffer."""
    dev = dict(device=device, dtype=torch.float16)
    caches = [(torch.randn(B, Hkv, ctx + 1, D, **dev), torch.randn(B, Hkv, ctx + 1, D, **dev)) for _ in range(n_layers)]
    return SimpleNamespace(
        caches=caches, v_sums=[v[:, :, :ctx].float().sum(2) for _, v in caches],
        out_v_sums=[torch.empty(B, Hkv, D, device=device) for _ in range(n_layers)],
        q=torch.randn(B, Hq, 1, D, **dev), k_new=torch.randn(B, Hkv, 1, D, **dev), v_new=torch.randn(B, Hkv, 1, D, **dev),
        seqlens=torch.full((B,), ctx, dtype=torch.int32, device=device))


def decode_config(B, Hq, Hkv, D, ctx, fractions, placements, repeats, layers, kernels=False, rounds=0):
    G, M = Hq // Hkv, ctx + 1
    n1, n2 = layers
    dev = dict(device="cuda", dtype=torch.float16)
    x = decode_inputs(B, Hq, Hkv, D, ctx, n2)
    caches, v_sums, out_v_sums, q, k_new, v_new, seqlens = x.caches, x.v_sums, x.out_v_sums, x.q, x.k_new, x.v_new, x.seqlens
    row = {"B": B, "Hq": Hq, "Hkv": Hkv, "D": D, "context": ctx}

    def gqa_runner(n):
        feeds = {"q": q.view(B, 1, Hq * D), "k_new": k_new.view(B, 1, Hkv * D), "v_new": v_new.view(B, 1, Hkv * D),
                 "seqlens_k": seqlens, "total_sequence_length": torch.tensor(ctx + 1, dtype=torch.int32)}
        outs = {f"y_{n - 1}": torch.empty(B, 1, Hq * D, **dev)}
        for i in range(n):
            feeds |= {f"past_key_{i}": caches[i][0], f"past_value_{i}": caches[i][1]}
            outs |= {f"present_key_{i}": caches[i][0], f"present_value_{i}": caches[i][1]}
        return Runner(gqa_model(n, B, Hq, Hkv, D, M), feeds, outs, cpu_inputs=("total_sequence_length",))

    def topt_runner(n, placement, compensation, theta, with_stats=False):
        feeds = {"q": q, "k_new": k_new, "v_new": v_new, "theta": theta, "past_seqlens": seqlens}
        outs = {f"y_{n - 1}": torch.empty(B, Hq, 1, D, **dev)}
        for i in range(n):
            feeds |= {f"past_key_{i}": caches[i][0], f"past_value_{i}": caches[i][1], f"past_v_sum_{i}": v_sums[i]}
            outs |= {f"present_key_{i}": caches[i][0], f"present_value_{i}": caches[i][1],
                     f"present_v_sum_{i}": out_v_sums[i]}
            if with_stats:
                outs[f"stats_{i}"] = torch.empty(B, Hq, 6, dtype=torch.int64, device="cuda")
        runner = Runner(topt_model(n, B, Hq, Hkv, D, M, placement, compensation, with_stats), feeds, outs)
        runner.stats = outs.get(f"stats_{n - 1}")
        return runner

    results = []
    row_gqa = slope_ms(gqa_runner, n1, n2, repeats)
    row_sdpa = sdpa_ms(B, Hq, Hkv, D, ctx + 1, n2, repeats)
    dense_bytes = 2 * B * Hkv * (ctx + 1) * D * 2
    for placement, compensation in placements:
        for fraction in fractions:
            theta, measured = find_thresholds(lambda t: topt_runner(1, placement, compensation, t, True), placement,
                                              fraction, Hq, G, ctx + 1)
            ms = slope_ms(lambda n: topt_runner(n, placement, compensation, theta), n1, n2, repeats)
            extra = {"kernels": kernel_times(topt_runner(n2, placement, compensation, theta), n2)} if kernels else {}
            if rounds > 0:
                extra |= paired_rounds({"sdpa": (SdpaGraph(q, caches[:n1]), SdpaGraph(q, caches[:n2])),
                                        "gqa": (gqa_runner(n1), gqa_runner(n2)),
                                        "topt": tuple(topt_runner(n, placement, compensation, theta) for n in (n1, n2))},
                                       n1, n2, rounds)
            read = B * Hkv * (ctx + 1) * D * 2 * (1 + measured)  # all of K + the kept V rows
            best_dense = min(row_gqa, row_sdpa)
            results.append(row | {"placement": placement, "compensation": compensation, "target_fraction": fraction,
                                  "union_kept_fraction": measured, "topt_ms": ms, "gqa_ms": row_gqa, "sdpa_ms": row_sdpa,
                                  "topt_GBps": read / ms / 1e6, "dense_GBps_best": dense_bytes / best_dense / 1e6,
                                  "speedup_vs_best_dense": best_dense / ms, "speedup_vs_gqa": row_gqa / ms} | extra)
            print(json.dumps(results[-1]), flush=True)
    if B * (ctx + 1) * Hkv * D * 2 * 2 * n2 < 24e9:  # Attention-23 copies the cache: skip where it would not fit
        def attention23_runner(n):
            feeds = {"q": q, "k_new": k_new, "v_new": v_new}
            outs = {f"y_{n - 1}": torch.empty(B, Hq, 1, D, **dev)}
            for i in range(n):
                feeds |= {f"past_key_{i}": caches[i][0][:, :, :ctx], f"past_value_{i}": caches[i][1][:, :, :ctx]}
                outs |= {f"present_key_{i}": torch.empty(B, Hkv, ctx + 1, D, **dev),
                         f"present_value_{i}": torch.empty(B, Hkv, ctx + 1, D, **dev)}
            return Runner(attention23_model(n, B, Hq, Hkv, D, ctx), feeds, outs)
        a23 = slope_ms(attention23_runner, n1, n2, repeats)
        for r in results:
            r["attention23_ms"] = a23
    del caches
    torch.cuda.empty_cache()
    return results


def kernel_times(runner, nodes, runs=5):
    """GPU time per node of each kernel (its own span: with PDL a kernel may start, and wait, while its
    predecessor runs) and the busy time (union of all spans), in µs, over `runs` runs of the chain."""
    from torch.profiler import ProfilerActivity, profile
    runner.run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(runs):
            runner.run()
        torch.cuda.synchronize()
    spans, names = [], {}
    for e in prof.events():
        if e.device_type.name == "CUDA":
            spans.append((e.time_range.start, e.time_range.end))
            name = e.name.replace("(anonymous namespace)::", "").split("(")[0].split("::")[-1][:48]
            names[name] = names.get(name, 0) + e.time_range.end - e.time_range.start
    spans.sort()
    busy, end = 0.0, float("-inf")
    for a, b in spans:
        if b > end:
            busy += b - max(a, end)
            end = b
    per = runs * nodes
    return {"busy_us": busy / per, "kernels_us": {n: round(t / per, 2) for n, t in sorted(names.items(), key=lambda kv: -kv[1])}}


def find_thresholds(make_stats_runner, placement, fraction, Hq, G, n):
    """Bisection on one score threshold z (pre: θ = z; post: θ = e^z / (n·e^0.5), the matching
    probability for N(0,1) scores) until the op's stats report the target union kept fraction."""
    lo, hi = -1.0, 8.0
    theta = torch.empty(Hq, 1, dtype=torch.float32, device="cuda")
    runner = make_stats_runner(theta)
    measured = None
    for _ in range(22):
        z = (lo + hi) / 2
        theta.fill_(z if placement == "pre_softmax" else math.exp(z) / (n * math.exp(0.5)))
        runner.run()
        stats = runner.stats.cpu().numpy()
        measured = float((stats[:, ::G, 5] / stats[:, ::G, 1]).mean())
        if abs(measured - fraction) / fraction < 0.03:
            break
        lo, hi = (z, hi) if measured > fraction else (lo, z)
    return theta, measured


def head_shapes(spec: str) -> list[tuple[int, int, int]]:
    """"32:8:128,9:3:64" → [(Hq, Hkv, D), ...]"""
    return [tuple(map(int, heads.split(":"))) for heads in spec.split(",")]


def report(results: list[dict], out: str | None, header: str, row) -> None:
    """results → `out` (JSON) and a markdown table on stdout, one row(r) per result."""
    if out:
        with open(out, "w") as f:
            json.dump(results, f, indent=1)
    print("\n" + header + "\n|" + "---|" * (header.count("|") - 1))
    for r in results:
        print(row(r))


def print_versions():
    print(f"device: {torch.cuda.get_device_name()}, onnxruntime {ort.__version__}, torch {torch.__version__}", flush=True)


def main():
    parser = argparse.ArgumentParser(description="decode attention: topt vs ORT GQA / Attention-23 / torch SDPA")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--contexts", default="4096,16384,32768,65536")
    parser.add_argument("--heads", default="32:8:128,9:3:64", help="Hq:Hkv:D,...")
    parser.add_argument("--fractions", default="0.25,0.0625,0.015625")
    parser.add_argument("--placements", default="pre_softmax:sdc_exact+vmc,post_softmax:vmc")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--kernels", action="store_true", help="also profile each topt config: µs per node of each kernel")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="ORT sessions replay a CUDA graph (enable_cuda_graph): GPU time per node, not ORT's host cost")
    parser.add_argument("--rounds", type=int, default=0,
                        help="also time each topt configuration against SDPA and GQA in this many paired rounds (see above)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    global CUDA_GRAPH
    CUDA_GRAPH = args.cuda_graph
    print_versions()
    results = []
    for B in map(int, args.batches.split(",")):
        for Hq, Hkv, D in head_shapes(args.heads):
            for ctx in map(int, args.contexts.split(",")):
                layer_bytes = 2 * B * Hkv * (ctx + 1) * D * 2
                n2 = int(max(3, min(12, 16e9 // layer_bytes)))
                results += decode_config(B, Hq, Hkv, D, ctx, [float(f) for f in args.fractions.split(",")],
                                         [tuple(p.split(":")) for p in args.placements.split(",")], args.repeats, (1, n2), args.kernels,
                                         args.rounds)
    report(results, args.out, "| B | Hq/Hkv/D | ctx | placement | kept (union) | topt ms | GQA ms | SDPA ms | A-23 ms | topt GB/s | vs best dense |",
           lambda r: f"| {r['B']} | {r['Hq']}/{r['Hkv']}/{r['D']} | {r['context']} | {r['placement']} | {r['union_kept_fraction']:.4f} | "
                     f"{r['topt_ms']:.4f} | {r['gqa_ms']:.4f} | {r['sdpa_ms']:.4f} | {r.get('attention23_ms', float('nan')):.4f} | "
                     f"{r['topt_GBps']:.0f} | {r['speedup_vs_best_dense']:.2f}x |"
                     + (f" paired: vs SDPA {r['paired_ratio_vs_sdpa']:.3f}x ({r['paired_ratio_vs_sdpa_q1']:.3f}-{r['paired_ratio_vs_sdpa_q3']:.3f}),"
                        f" vs GQA {r['paired_ratio_vs_gqa']:.3f}x ({r['paired_ratio_vs_gqa_q1']:.3f}-{r['paired_ratio_vs_gqa_q3']:.3f}) |"
                        if "paired_ratio_vs_sdpa" in r else ""))
    for r in results:
        if "kernels" in r:
            print(f"B={r['B']} {r['Hq']}/{r['Hkv']}/{r['D']} ctx={r['context']} {r['placement']}: busy {r['kernels']['busy_us']:.1f} µs/node; "
                  + ", ".join(f"{n} {t}" for n, t in r["kernels"]["kernels_us"].items()))


if __name__ == "__main__":
    main()
