"""Session 12's decode fixed-cost experiment (a record, with its results beside it; see
bench/results/cuda_kernel.md, top section). Times TopThetaAttention decode nodes as CUDA-graph replays
(bench/decode_attention.py's slope method, pre_softmax + exact SDC + VMC, union kept ~1/16) under
variants chosen by environment variables that only an instrumented library reads
(instrumentation.patch: TOPT_EXP flags, TOPT_CUDA_DECODE_WAVES per call; cluster_merge.patch:
TOPT_CUDA_DECODE_FUSED_MAX_SPLITS, TOPT_EXP_CLUSTER_NOFUSE). TABLE=1: a 507-column threshold table
per layer, as a calibrated model has (else one θ column shared by every layer).

Usage (GPU machine, repository root): TABLE=1 OUT=dir python bench/results/decode_fixed_cost/exp_fixed.py \
    B:Hq:Hkv:D:ctx,... waves/flags,... [repeats]"""
import json, os, sys
sys.path.insert(0, os.getcwd()); sys.path.insert(0, os.getcwd() + "/bench")
import torch
import decode_attention as da
da.CUDA_GRAPH = True
configs = [tuple(map(int, c.split(":"))) for c in sys.argv[1].split(",")]  # B:Hq:Hkv:D:ctx
variants = [v.split("/") for v in sys.argv[2].split(",")]  # waves/exp
repeats = int(sys.argv[3]) if len(sys.argv) > 3 else 20
out = []
TABLE = os.environ.get('TABLE') == '1'
for B, Hq, Hkv, D, ctx in configs:
    G, M = Hq // Hkv, ctx + 1
    n2 = int(max(3, min(12, 16e9 // (2 * B * Hkv * (ctx + 1) * D * 2))))
    dev = dict(device="cuda", dtype=torch.float16)
    x = da.decode_inputs(B, Hq, Hkv, D, ctx, n2)
    caches, v_sums, out_v_sums, q, k_new, v_new, seqlens = x.caches, x.v_sums, x.out_v_sums, x.q, x.k_new, x.v_new, x.seqlens
    def runner(n, theta, with_stats=False):
        feeds = {"q": q, "k_new": k_new, "v_new": v_new, "theta": theta, "past_seqlens": seqlens}
        outs = {f"y_{n - 1}": torch.empty(B, Hq, 1, D, **dev)}
        for i in range(n):
            feeds |= {f"past_key_{i}": caches[i][0], f"past_value_{i}": caches[i][1], f"past_v_sum_{i}": v_sums[i]}
            outs |= {f"present_key_{i}": caches[i][0], f"present_value_{i}": caches[i][1], f"present_v_sum_{i}": out_v_sums[i]}
            if with_stats:
                outs[f"stats_{i}"] = torch.empty(B, Hq, 6, dtype=torch.int64, device="cuda")
        model = da.topt_model(n, B, Hq, Hkv, D, M, "pre_softmax", "sdc_exact+vmc", with_stats)
        if TABLE and not with_stats:  # a 507-column table per layer, as a calibrated model has
            import numpy as np
            from onnx import numpy_helper
            z = float(theta[0, 0].item())
            g = model.graph
            for node in g.node:
                if node.op_type == "TopThetaAttention":
                    layer = node.name
                    node.input[6] = f"th_{layer}"; node.input[7] = f"tl_{layer}"
                    g.initializer.append(numpy_helper.from_array(np.full((Hq, 507), z, np.float32), f"th_{layer}"))
                    g.initializer.append(numpy_helper.from_array(np.arange(507, dtype=np.int64) * 16, f"tl_{layer}"))
            feeds.pop("theta")
            keep = [i for i in g.input if i.name != "theta"]
            del g.input[:]; g.input.extend(keep)
        r = da.Runner(model, feeds, outs)
        r.stats = outs.get(f"stats_{n - 1}")
        return r
    os.environ["TOPT_EXP"] = "0"; os.environ["TOPT_CUDA_DECODE_WAVES"] = "1"
    theta, measured = da.find_thresholds(lambda t: runner(1, t, True), "pre_softmax", 0.0625, Hq, G, ctx + 1)
    sdpa = da.sdpa_ms(B, Hq, Hkv, D, ctx + 1, n2, repeats)
    row = {"cfg": f"B={B} {Hq}/{Hkv}/{D} ctx={ctx}", "kept": round(measured, 4), "sdpa_us": round(sdpa * 1e3, 2)}
    for waves, exp in variants:
        os.environ["TOPT_EXP"] = exp; os.environ["TOPT_CUDA_DECODE_WAVES"] = waves
        t = [da.slope_ms(lambda n: runner(n, theta), 1, n2, repeats) * 1e3 for _ in range(2)]
        row[f"w{waves}/e{exp}"] = [round(x, 2) for x in t]
        if exp == "0":
            k = da.kernel_times(runner(n2, theta), n2)
            row[f"w{waves}/e{exp}/kern"] = k
        print(row["cfg"], f"w{waves}/e{exp}", row[f"w{waves}/e{exp}"], flush=True)
    print(json.dumps(row), flush=True)
    out.append(row)
    del caches; torch.cuda.empty_cache()
os.makedirs(os.environ.get("OUT", "/tmp"), exist_ok=True)
json.dump(out, open(os.path.join(os.environ.get("OUT", "/tmp"), "exp_fixed.json"), "w"), indent=1)
