"""Prompt (prefill) attention on the GPU, side by side in one run: topt's TopThetaAttention (its tiled
prefill kernel, CUDA EP) against ONNX Runtime's dense com.microsoft.GroupQueryAttention (a first
prompt, past and present one buffer, as onnxruntime-genai runs it), ONNX Attention-23 (is_causal) and
torch SDPA (flash), all causal, fp16.

What the Top-θ kernel skips is the P·V work (and nothing else) of a tile in which no row keeps a
key: 16 query rows × 64 keys (a warp's, the mma.sync kernel) or, on sm_90 at Dh 128, 64 rows × 64
keys (a warpgroup's, the wgmma kernel): --tile-rows. So the thresholds are set to hit a target
fraction of the visible tiles of that size that keep nothing ("tiles below θ"), by bisection on one score threshold z with
torch on the same inputs: pre-softmax θ = z for every row length; post-softmax θ(n) = e^z / (n·e^0.5),
the matching probability for N(0, 1) scores, in threshold columns every 64 keys. Inputs are random
normal (never zeros), so kept keys are spread evenly: reaching a given tile fraction keeps fewer
keys per row than real attention, whose kept keys cluster (sinks, the diagonal); the kernel's time
depends on the tiles it skips, and both fractions are reported (and the 16-row tiles' fraction).

Time per node: every model is N independent nodes (same Q, each with its own K/V, so no node's K/V
sits in L2 for the next), bound with I/O binding to torch device buffers; the time per node is the
slope (t(N2) − t(N1)) / (N2 − N1), medians of many runs. torch SDPA: CUDA events around N2 calls.

Paired rounds (--rounds R): an H100 running these kernels sits at its 700 W power cap, and its SM
clock swings between about 1.35 and 1.8 GHz over a second or so, so two kernels timed a few hundred
ms apart see different clocks (one kernel's time moved by ±5% between runs). With R > 0 every topt
configuration is also timed in R rounds against ORT GQA: single runs of each, interleaved, so that a
round's two slopes see about the same clock. The median of the rounds' ratios and its quartiles are
reported ("paired_ratio_vs_gqa"), with the SM clock and power NVML reported at each round.

Usage (GPU machine, onnxruntime-gpu + torch):
  python bench/prefill_attention.py --lengths 4096,8192,16384 --heads 32:8:128,9:3:64 --skips 0.7,0.9 --out r.json
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys

import numpy as np
import torch
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, __file__.rsplit("/bench/", 1)[0])
from decode_attention import Runner, head_shapes, print_versions, report, slope_ms, value_info  # noqa: E402  (bench/ is on sys.path when run as a script)
from paired import paired_rounds  # noqa: E402
from topt_compile.ops import schema  # noqa: E402

F16 = TensorProto.FLOAT16
WARP_ROWS, TILE_KEYS, COLUMN_EVERY = 16, 64, 64


def theta_table(placement: str, z: float, Hq: int, S: int) -> tuple[np.ndarray, np.ndarray]:
    """thresholds [Hq, L] and threshold_lengths [L] for one score threshold z (see the docstring)."""
    if placement == "pre_softmax":
        return np.full((Hq, 1), z, np.float32), np.array([0], np.int64)
    lengths = np.arange(0, S + 1, COLUMN_EVERY, dtype=np.int64)
    theta = np.exp(z) / (np.maximum(lengths, COLUMN_EVERY // 2) * math.exp(0.5))
    return np.tile(theta.astype(np.float32), (Hq, 1)), lengths


def topt_model(n, B, Hq, Hkv, S, D, placement, compensation, theta, lengths, dense_prompt=0):
    """n TopThetaAttention nodes on the same Q, each with its own K/V; shared_buffer, past_seqlens 0."""
    nodes, inputs, outputs = [], [value_info("q", F16, [B, Hq, S, D]), value_info("past_seqlens", TensorProto.INT32, [B])], []
    for i in range(n):
        inputs += [value_info(f"k_{i}", F16, [B, Hkv, S, D]), value_info(f"v_{i}", F16, [B, Hkv, S, D]),
                   value_info(f"cache_k_{i}", F16, [B, Hkv, S, D]), value_info(f"cache_v_{i}", F16, [B, Hkv, S, D])]
        outs = {"Y": f"y_{i}", "present_key": f"present_key_{i}", "present_value": f"present_value_{i}"}
        nodes.append(schema.make_node(
            {"Q": "q", "K": f"k_{i}", "V": f"v_{i}", "past_key": f"cache_k_{i}", "past_value": f"cache_v_{i}",
             "thresholds": "theta", "threshold_lengths": "theta_lengths", "past_seqlens": "past_seqlens"},
            outs, schema.Attributes(is_causal=1, placement=placement, compensation=compensation,
                                    kv_layout="shared_buffer", dense_prompt=dense_prompt), name=f"node{i}"))
        outputs += [value_info(f"y_{i}", F16, [B, Hq, S, D]), value_info(f"present_key_{i}", F16, [B, Hkv, S, D]),
                    value_info(f"present_value_{i}", F16, [B, Hkv, S, D])]
    graph = helper.make_graph(nodes, "topt_prefill", inputs, outputs,
                              initializer=[numpy_helper.from_array(theta, "theta"), numpy_helper.from_array(lengths, "theta_lengths")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), schema.opset_import()], ir_version=10)


def gqa_model(n, B, Hq, Hkv, S, D):
    """n com.microsoft.GroupQueryAttention nodes: a first prompt of S tokens, past and present one buffer."""
    nodes, outputs = [], []
    inputs = [value_info("q", F16, [B, S, Hq * D]), value_info("seqlens_k", TensorProto.INT32, [B]),
              value_info("total_sequence_length", TensorProto.INT32, [])]
    for i in range(n):
        inputs += [value_info(f"k_{i}", F16, [B, S, Hkv * D]), value_info(f"v_{i}", F16, [B, S, Hkv * D]),
                   value_info(f"cache_k_{i}", F16, [B, Hkv, S, D]), value_info(f"cache_v_{i}", F16, [B, Hkv, S, D])]
        nodes.append(helper.make_node(
            "GroupQueryAttention", ["q", f"k_{i}", f"v_{i}", f"cache_k_{i}", f"cache_v_{i}", "seqlens_k", "total_sequence_length"],
            [f"y_{i}", f"present_key_{i}", f"present_value_{i}"], domain="com.microsoft",
            num_heads=Hq, kv_num_heads=Hkv, scale=1.0 / math.sqrt(D), name=f"node{i}"))
        outputs += [value_info(f"y_{i}", F16, [B, S, Hq * D]), value_info(f"present_key_{i}", F16, [B, Hkv, S, D]),
                    value_info(f"present_value_{i}", F16, [B, Hkv, S, D])]
    graph = helper.make_graph(nodes, "gqa_prefill", inputs, outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)],
                             ir_version=10)


def attention23_model(n, B, Hq, Hkv, S, D):
    """n ONNX Attention-23 nodes, is_causal, no past."""
    nodes, outputs = [], []
    inputs = [value_info("q", F16, [B, Hq, S, D])]
    for i in range(n):
        inputs += [value_info(f"k_{i}", F16, [B, Hkv, S, D]), value_info(f"v_{i}", F16, [B, Hkv, S, D])]
        nodes.append(helper.make_node("Attention", ["q", f"k_{i}", f"v_{i}"], [f"y_{i}"], is_causal=1, name=f"node{i}"))
        outputs.append(value_info(f"y_{i}", F16, [B, Hq, S, D]))
    graph = helper.make_graph(nodes, "attention23_prefill", inputs, outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)], ir_version=11)


@torch.no_grad()
def tile_fractions(q, k, placement, z, heads, tile_rows=WARP_ROWS, rows_per_chunk=1024):
    """(fraction of visible tiles of tile_rows × 64 keys that keep no key, fraction of visible scores
    kept) of batch 0, for the given query heads, with the kernel's rule: causal, pre a > θ, post
    e/Z > θ(n)."""
    Hq, S, D = q.shape[1], q.shape[2], q.shape[3]
    G, scale = Hq // k.shape[1], 1.0 / math.sqrt(D)
    theta, lengths = theta_table(placement, z, 1, S)
    theta_t, lengths_t = torch.tensor(theta[0], device=q.device), torch.tensor(lengths, device=q.device)
    skipped = visible = kept = seen = 0
    for h in heads:
        kh = k[0, h // G].float()
        for r0 in range(0, S, rows_per_chunk):
            r1 = min(S, r0 + rows_per_chunk)
            rows = torch.arange(r0, r1, device=q.device)
            a = (q[0, h, r0:r1].float() @ kh.T) * scale                      # [R, S]
            vis = torch.arange(S, device=q.device)[None, :] <= rows[:, None]
            a = a.masked_fill(~vis, float("-inf"))
            if placement == "pre_softmax":
                keep = a > float(theta_t[0])
            else:
                col = torch.searchsorted(lengths_t, rows + 1, right=True) - 1  # the largest column with length <= n
                keep = torch.softmax(a, dim=1) > theta_t[col.clamp(min=0)][:, None]
            keep &= vis
            R = r1 - r0
            tiles_keep = keep.view(R // tile_rows, tile_rows, S // TILE_KEYS, TILE_KEYS).any(3).any(1)
            tile_vis = vis.view(R // tile_rows, tile_rows, S // TILE_KEYS, TILE_KEYS).any(3).any(1)
            skipped += int((tile_vis & ~tiles_keep).sum())
            visible += int(tile_vis.sum())
            kept += int(keep.sum())
            seen += int(vis.sum())
    return skipped / visible, kept / seen


def find_z(q, k, placement, target, heads, tile_rows):
    lo, hi = 0.0, 12.0
    for _ in range(18):
        z = (lo + hi) / 2
        skip, _ = tile_fractions(q, k, placement, z, heads, tile_rows)
        if abs(skip - target) < 0.005:
            break
        lo, hi = (lo, z) if skip > target else (z, hi)
    return z


def sdpa_ms(q, ks, vs, G, repeats):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    ks = [k.repeat_interleave(G, dim=1) for k in ks]
    vs = [v.repeat_interleave(G, dim=1) for v in vs]
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        def run():
            for k, v in zip(ks, vs):
                torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        for _ in range(3):
            run()
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / len(ks))
    return statistics.median(times)


def prefill_config(B, Hq, Hkv, D, S, skips, placements, repeats, layers, tile_rows=WARP_ROWS, rounds=0):
    G, n1, n2 = Hq // Hkv, layers[0], layers[1]
    dev = dict(device="cuda", dtype=torch.float16)
    q = torch.randn(B, Hq, S, D, **dev)
    ks = [torch.randn(B, Hkv, S, D, **dev) for _ in range(n2)]
    vs = [torch.randn(B, Hkv, S, D, **dev) for _ in range(n2)]
    caches = [(torch.empty(B, Hkv, S, D, **dev), torch.empty(B, Hkv, S, D, **dev)) for _ in range(n2)]
    zeros = torch.zeros(B, dtype=torch.int32, device="cuda")
    row = {"B": B, "Hq": Hq, "Hkv": Hkv, "D": D, "S": S}
    flops = 2 * B * Hq * S * S * D  # causal: half of 2 matmuls of 2·S·S·D each

    def gqa_runner(n):
        qb = q.transpose(1, 2).reshape(B, S, Hq * D)
        feeds = {"q": qb, "seqlens_k": torch.full((B,), S - 1, dtype=torch.int32, device="cuda"),
                 "total_sequence_length": torch.tensor(S, dtype=torch.int32)}
        outs = {}
        for i in range(n):
            feeds |= {f"k_{i}": ks[i].transpose(1, 2).reshape(B, S, Hkv * D), f"v_{i}": vs[i].transpose(1, 2).reshape(B, S, Hkv * D),
                      f"cache_k_{i}": caches[i][0], f"cache_v_{i}": caches[i][1]}
            outs |= {f"y_{i}": torch.empty(B, S, Hq * D, **dev), f"present_key_{i}": caches[i][0], f"present_value_{i}": caches[i][1]}
        return Runner(gqa_model(n, B, Hq, Hkv, S, D), feeds, outs, cpu_inputs=("total_sequence_length",))

    def attention23_runner(n):
        feeds, outs = {"q": q}, {}
        for i in range(n):
            feeds |= {f"k_{i}": ks[i], f"v_{i}": vs[i]}
            outs[f"y_{i}"] = torch.empty(B, Hq, S, D, **dev)
        return Runner(attention23_model(n, B, Hq, Hkv, S, D), feeds, outs)

    def topt_runner(n, placement, compensation, theta, lengths, dense_prompt=0):
        feeds, outs = {"q": q, "past_seqlens": zeros}, {}
        for i in range(n):
            feeds |= {f"k_{i}": ks[i], f"v_{i}": vs[i], f"cache_k_{i}": caches[i][0], f"cache_v_{i}": caches[i][1]}
            outs |= {f"y_{i}": torch.empty(B, Hq, S, D, **dev), f"present_key_{i}": caches[i][0], f"present_value_{i}": caches[i][1]}
        return Runner(topt_model(n, B, Hq, Hkv, S, D, placement, compensation, theta, lengths, dense_prompt), feeds, outs)

    dense = {"gqa_ms": slope_ms(gqa_runner, n1, n2, repeats), "sdpa_ms": sdpa_ms(q, ks, vs, G, repeats)}
    try:
        dense["attention23_ms"] = slope_ms(attention23_runner, n1, n2, repeats)
    except Exception as e:  # noqa: BLE001 — a dense baseline ORT cannot run here is reported, not fatal
        dense["attention23_ms"], dense["attention23_error"] = float("nan"), str(e).splitlines()[0][:200]
    best = min(v for key, v in dense.items() if key.endswith("_ms") and not math.isnan(v))
    results = []
    probe_heads = [0, Hq - 1]
    for placement, compensation, *mode in placements:
        dense_prompt = int(mode == ["dense_prompt"])
        for target in [0.0] if dense_prompt else skips:
            if target <= 0:
                z = -math.inf if placement == "pre_softmax" else -50.0  # keep everything
            else:
                z = find_z(q, ks[0], placement, target, probe_heads, tile_rows)
            skip, kept = tile_fractions(q, ks[0], placement, z, range(Hq), tile_rows)
            warp_skip = skip if tile_rows == WARP_ROWS else tile_fractions(q, ks[0], placement, z, range(Hq))[0]
            theta, lengths = theta_table(placement, z, Hq, S)
            ms = slope_ms(lambda n: topt_runner(n, placement, compensation, theta, lengths, dense_prompt), n1, n2, repeats)
            paired = {}
            if rounds > 0:
                paired = paired_rounds({"gqa": (gqa_runner(n1), gqa_runner(n2)),
                                        "topt": tuple(topt_runner(n, placement, compensation, theta, lengths, dense_prompt) for n in (n1, n2))},
                                       n1, n2, rounds)
            results.append(row | dense | paired | {
                "placement": placement + (" dense_prompt" if dense_prompt else ""), "compensation": compensation,
                "target_tiles_skipped": target, "z": z,
                "tile_rows": tile_rows, "tiles_skipped": skip, "warp_tiles_skipped": warp_skip, "kept_fraction": kept, "topt_ms": ms, "best_dense_ms": best,
                "speedup_vs_best_dense": best / ms, "dense_TFLOPs": flops / best / 1e9, "topt_dense_equiv_TFLOPs": flops / ms / 1e9})
            print(json.dumps(results[-1]), flush=True)
    del ks, vs, caches
    torch.cuda.empty_cache()
    return results


def main():
    parser = argparse.ArgumentParser(description="prefill attention: topt vs ORT GQA / Attention-23 / torch SDPA")
    parser.add_argument("--batches", default="1")
    parser.add_argument("--lengths", default="4096,8192,16384")
    parser.add_argument("--heads", default="32:8:128,9:3:64", help="Hq:Hkv:D,...")
    parser.add_argument("--skips", default="0,0.7,0.9", help="target fractions of visible tiles that keep nothing (0: θ = -inf)")
    parser.add_argument("--tile-rows", type=int, default=WARP_ROWS,
                        help="query rows of the skip unit: 16 (mma.sync kernel) or 64 (the sm_90 wgmma kernel, Dh 128)")
    parser.add_argument("--placements", default="pre_softmax:sdc_exact+vmc,post_softmax:vmc,post_softmax:vmc:dense_prompt",
                        help="placement:compensation[:dense_prompt] (dense_prompt: the attribute set, every key kept)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=0,
                        help="also time each topt configuration against ORT GQA in this many paired rounds (see above)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    print_versions()
    results = []
    for B in map(int, args.batches.split(",")):
        for Hq, Hkv, D in head_shapes(args.heads):
            for S in map(int, args.lengths.split(",")):
                results += prefill_config(B, Hq, Hkv, D, S, [float(s) for s in args.skips.split(",")],
                                          [tuple(p.split(":")) for p in args.placements.split(",")], args.repeats, (1, 3),
                                          args.tile_rows, args.rounds)
    report(results, args.out, "| B | Hq/Hkv/D | S | placement | tiles skipped (16-row) | kept | topt ms | GQA ms | SDPA ms | A-23 ms | vs best dense |",
           lambda r: f"| {r['B']} | {r['Hq']}/{r['Hkv']}/{r['D']} | {r['S']} | {r['placement']} | {r['tiles_skipped']:.3f} "
                     f"({r['warp_tiles_skipped']:.3f}) | "
                     f"{r['kept_fraction']:.5f} | {r['topt_ms']:.3f} | {r['gqa_ms']:.3f} | {r['sdpa_ms']:.3f} | "
                     f"{r['attention23_ms']:.3f} | {r['speedup_vs_best_dense']:.2f}x |"
                     + (f" paired vs GQA {r['paired_ratio_vs_gqa']:.3f}x (quartiles {r['paired_ratio_vs_gqa_q1']:.3f}-{r['paired_ratio_vs_gqa_q3']:.3f}) |"
                        if "paired_ratio_vs_gqa" in r else ""))


if __name__ == "__main__":
    main()
