"""Where a decode node's time goes, CTA by CTA: a library built with -DTOPT_DECODE_TRACE=1 stamps
%globaltimer in thread 0 of every split and merge CTA (entry; after the tile loop / after the wait;
end) with its SM. This runs a chain of decode nodes (bench/decode_attention.py's model, thresholds
bisected to a union kept fraction), replays it, reads the stamps of the chain's last two calls
through the library's `topt_decode_trace` and reports, per call, each stamp's min / median / max
relative to the first split CTA's entry, µs.

    python bench/decode_trace.py --configs 1:32:8:128:8192,32:9:3:64:8192 --cuda-graph
(GPU machine; TOPT_LIBRARY_PATH=<the trace build's libtopt_ops.so>)
"""
from __future__ import annotations

import argparse
import ctypes
import json
import sys

import numpy as np
import torch

sys.path.insert(0, __file__.rsplit("/bench/", 1)[0])
sys.path.insert(0, __file__.rsplit("/", 1)[0])
import decode_attention as da  # noqa: E402
import topt_compile  # noqa: E402

CTAS = 4096
# stamp columns: split CTAs, merge CTAs (column 7: the SM)
SPLIT_STAMPS = {"entry": [0], "warp loop end (first warp)": [1, 2, 3, 4], "warp loop end (last warp)": [1, 2, 3, 4], "end": [5]}
MERGE_STAMPS = {"entry": [0], "after wait": [1], "after loads": [2], "after reductions": [3], "end": [4]}


def read_trace(lib) -> np.ndarray:
    buf = (ctypes.c_ulonglong * (2 * 2 * CTAS * 8))()
    if lib.topt_decode_trace(buf, len(buf)) != 0:
        raise RuntimeError("topt_decode_trace failed")
    return np.frombuffer(buf, dtype=np.uint64).reshape(2, 2, CTAS, 8).astype(np.int64)


def runner_for(x, B, Hq, Hkv, D, ctx, n, theta, with_stats=False):
    dev = dict(device="cuda", dtype=torch.float16)
    feeds = {"q": x.q, "k_new": x.k_new, "v_new": x.v_new, "theta": theta, "past_seqlens": x.seqlens}
    outs = {f"y_{n - 1}": torch.empty(B, Hq, 1, D, **dev)}
    for i in range(n):
        feeds |= {f"past_key_{i}": x.caches[i][0], f"past_value_{i}": x.caches[i][1], f"past_v_sum_{i}": x.v_sums[i]}
        outs |= {f"present_key_{i}": x.caches[i][0], f"present_value_{i}": x.caches[i][1], f"present_v_sum_{i}": x.out_v_sums[i]}
        if with_stats:
            outs[f"stats_{i}"] = torch.empty(B, Hq, 6, dtype=torch.int64, device="cuda")
    model = da.topt_model(n, B, Hq, Hkv, D, ctx + 1, "pre_softmax", "sdc_exact+vmc", with_stats)
    runner = da.Runner(model, feeds, outs)
    runner.stats = outs.get(f"stats_{n - 1}")
    return runner


def summarize(trace: np.ndarray, newest: int) -> list[dict]:
    """Per slot whose stamps are from the last replay: stamps relative to its first split entry."""
    calls = []
    for slot in range(2):
        split, merge = trace[slot, 0], trace[slot, 1]
        live_s = split[:, 0] > newest - 2_000_000  # within 2 ms of the newest stamp: this replay
        live_m = merge[:, 0] > newest - 2_000_000
        if not live_s.any():
            continue
        s, m = split[live_s], merge[live_m]
        t0 = s[:, 0].min()
        row = {"split_ctas": int(live_s.sum()), "merge_ctas": int(live_m.sum()), "t0": int(t0)}
        for name, arr, stamps in (("split", s, SPLIT_STAMPS), ("merge", m, MERGE_STAMPS)):
            for stamp, cols in stamps.items():
                pick = arr[:, cols].max(1) if "last" in stamp else arr[:, cols].min(1)
                v = (pick - t0) / 1e3
                row[f"{name} {stamp}"] = [round(float(v.min()), 2), round(float(np.median(v)), 2), round(float(v.max()), 2)]
        row["split busy (end - entry) median"] = round(float(np.median(s[:, 5] - s[:, 0])) / 1e3, 2)
        row["split SMs"] = int(len(np.unique(s[:, 7])))
        row["raw µs"] = {"split": ((s[:, :6] - t0) / 1e3).round(2).tolist(), "split sm": s[:, 7].tolist(),
                         "merge": ((m[:, :5] - t0) / 1e3).round(2).tolist(), "merge sm": m[:, 7].tolist()}
        calls.append(row)
    calls.sort(key=lambda r: r["t0"])
    if len(calls) == 2:  # the gap from the previous call's last merge end to this call's first split entry
        calls[1]["from previous call's last merge end"] = round(
            (calls[1]["t0"] - (calls[0]["t0"] + calls[0]["merge end"][2] * 1e3)) / 1e3, 2)
    return calls


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="1:32:8:128:8192,1:32:8:128:32768,1:9:3:64:8192,32:9:3:64:8192",
                    help="B:Hq:Hkv:D:context,...")
    ap.add_argument("--fraction", type=float, default=0.0625)
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--cuda-graph", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    da.CUDA_GRAPH = args.cuda_graph
    lib = ctypes.CDLL(topt_compile.get_library_path())
    results = []
    for config in args.configs.split(","):
        B, Hq, Hkv, D, ctx = map(int, config.split(":"))
        x = da.decode_inputs(B, Hq, Hkv, D, ctx, args.nodes)
        theta, kept = da.find_thresholds(lambda t: runner_for(x, B, Hq, Hkv, D, ctx, 1, t, True), "pre_softmax",
                                         args.fraction, Hq, Hq // Hkv, ctx + 1)
        runner = runner_for(x, B, Hq, Hkv, D, ctx, args.nodes, theta)
        for _ in range(20):
            runner.run()
        torch.cuda.synchronize()
        trace = read_trace(lib)
        calls = summarize(trace, int(trace[:, :, :, 0].max()))
        results.append({"config": config, "union_kept_fraction": kept, "calls": calls})
        print(f"== B={B} {Hq}/{Hkv}/{D} ctx={ctx} kept {kept:.4f}")
        for c in calls:
            print("  " + json.dumps({k: v for k, v in c.items() if k not in ("t0", "raw µs")}))
        del runner, x
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"command": " ".join(sys.argv), "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
