"""Dense decode baseline: torch SDPA (flash backend, GQA) on the harness's timing shapes.

Same method as `harness time`: fp16, one query row, KV copies rotated so L2 does not hold them,
a CUDA graph of 20 calls replayed 15 times (after 3 warm-ups), median replay / 20. Prints ms and GB/s on the K+V bytes (dense reads all).
Usage: python3 bench/cuda/sdpa_baseline.py [csv]
"""
import sys
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

CFGS = [(b, 32, 8, 128, t) for b in (1, 8) for t in (4096, 8192, 16384, 32768, 65536)] + \
       [(b, 9, 3, 64, t) for b in (1, 8) for t in (4096, 8192, 16384, 32768, 65536)]


def time_cfg(B, Hq, Hkv, D, T, backend):
    kv_bytes = B * Hkv * T * D * 2
    copies = max(1, (400 << 20) // (2 * kv_bytes) + 1)
    q = torch.randn(B, Hq, 1, D, device="cuda", dtype=torch.float16)
    kvs = [(torch.randn(B, Hkv, T, D, device="cuda", dtype=torch.float16),
            torch.randn(B, Hkv, T, D, device="cuda", dtype=torch.float16)) for _ in range(copies)]
    # A CUDA graph of R calls rotating over the copies, replayed (as `harness time`): no host gaps.
    R = 20
    with sdpa_kernel([backend]):
        F.scaled_dot_product_attention(q, *kvs[0], enable_gqa=True)  # warm-up / backend check
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            with torch.cuda.graph(graph, stream=stream):
                for it in range(R):
                    k, v = kvs[it % copies]
                    F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    times = []
    for rep in range(-3, 15):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        graph.replay()
        e1.record()
        e1.synchronize()
        if rep >= 0:
            times.append(e0.elapsed_time(e1) / R)
    times.sort()
    ms = times[len(times) // 2]
    return ms, 2 * kv_bytes / ms * 1e-6


def main():
    warnings.filterwarnings("ignore")
    out = open(sys.argv[1], "w") if len(sys.argv) > 1 else None
    if out:
        out.write("B,Hq,Hkv,D,ctx,backend,ms,gbps\n")
    print(f"{'B':<3} {'heads':<6} {'D':<4} {'ctx':<6} {'backend':<10} {'ms':<8} GB/s")
    for cfg in CFGS:
        for name, backend in (("flash", SDPBackend.FLASH_ATTENTION),):
            try:
                ms, gbps = time_cfg(*cfg, backend)
            except RuntimeError as exc:  # backend refuses the shape
                print(f"{cfg} {name}: {str(exc).splitlines()[0][:80]}")
                continue
            B, Hq, Hkv, D, T = cfg
            print(f"{B:<3} {Hq}/{Hkv:<4} {D:<4} {T:<6} {name:<10} {ms:<8.4f} {gbps:.0f}")
            if out:
                out.write(f"{B},{Hq},{Hkv},{D},{T},{name},{ms:.5f},{gbps:.1f}\n")
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
