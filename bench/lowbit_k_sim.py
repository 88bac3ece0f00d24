"""Would a low-bit copy of K let an exact Top-θ decode step skip most of K? Real SmolLM2 Q/K.

    python bench/lowbit_k_sim.py --table bench/results/t_smollm2_genai_k256_8k_pre.json.gz \
        --length 4000 --output bench/results/lowbit_k_sim_4k

The idea (issue #6, last bullet): keep a low-bit copy of K beside the cache; a key's score from the
copy, â, is within a bound β of its true score a; only keys with â + β > θ (candidates) have
their full K re-read, only kept keys their V. Exact: no kept key is ever missed (checked here).
β is the worst case over the quantization cell: scale · Σ_c |q_c| · err_c, err_c half a step of
channel c's grid for that key.

Runs SmolLM2 (transformers, float32) on one ARC prompt of `--length` tokens (bench/generate.py's
prompts), takes every layer's post-RoPE Q of the last `--rows` positions and all K, and, for each
quantization scheme, reports per row (the union over a KV group's query heads, as the kernel reads):
the candidate fraction, the kept (V row) fraction, and the bytes a step reads relative to reading
all of K in fp16 — now (all of K + kept V) and with the copy (copy + candidates' K + kept V).
The thresholds are a pre-softmax table (θ on the raw score).
"""
import argparse
import gzip
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from generate import prompts  # noqa: E402
from topt_compile.data import Tokenizer  # noqa: E402
from topt_compile.frontends.export import load_smollm2, smollm2_gguf  # noqa: E402

# name: (bits, grouping) — "token": one scale per key (symmetric); "token+channel": the same after
# dividing each channel by its absmax over the prompt (a calibrated per-channel range); an int:
# per-channel min and step over blocks of that many keys (asymmetric, KIVI-style; the cache's
# last, partial block would stay fp16)
SCHEMES = {"int8 token": (8, "token"), "int8 token+channel": (8, "token+channel"),
           "int4 token": (4, "token"), "int4 token+channel": (4, "token+channel"),
           "int4 channel, blocks of 32": (4, 32), "int4 channel, blocks of 64": (4, 64),
           "int4 channel, blocks of 128": (4, 128), "int3 channel, blocks of 64": (3, 64)}


def capture_qk(length: int, rows: int, seed: int) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """layer → (Q [Hq, rows, D] of the last rows, K [Hkv, T, D]), float64, after RoPE."""
    import torch
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    captured = {}

    def capture(module, query, key, value, attention_mask, **kwargs):
        captured[module.layer_idx] = (query[0, :, -rows:].double().numpy(), key[0].double().numpy())
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("topt_capture", capture)
    model = load_smollm2("float32", attn_implementation="topt_capture")
    ids = prompts(Tokenizer(smollm2_gguf()), 1, length, seed)
    with torch.no_grad():
        model(torch.tensor(ids))
    return captured


def quantize(K: np.ndarray, bits: int, grouping) -> tuple[np.ndarray, np.ndarray]:
    """(K̂, err): the dequantized keys and each element's worst-case error |K − K̂| (same shape)."""
    T, D = K.shape
    if grouping in ("token", "token+channel"):
        mult = np.abs(K).max(0) + 1e-12 if grouping == "token+channel" else np.ones(D)
        qmax = 2 ** (bits - 1) - 1
        X = K / mult
        step = np.abs(X).max(1, keepdims=True) / qmax
        step = step.astype(np.float16).astype(np.float64) * (1 + 2 ** -9) + 1e-30  # stored fp16, rounded up
        codes = np.clip(np.rint(X / step), -qmax, qmax)
        return codes * step * mult, np.broadcast_to(step / 2 * mult, K.shape)
    levels = 2 ** bits - 1
    Kh, err = np.empty_like(K), np.empty_like(K)
    for t0 in range(0, T, grouping):
        X = K[t0:t0 + grouping]
        lo = X.min(0).astype(np.float16).astype(np.float64)
        step = ((X.max(0) - lo) / levels).astype(np.float16).astype(np.float64) * (1 + 2 ** -9) + 1e-30
        Kh[t0:t0 + grouping] = lo + np.clip(np.rint((X - lo) / step), 0, levels) * step
        err[t0:t0 + grouping] = step / 2
    return Kh, err


def copy_bytes_per_key(bits: int, grouping, D: int) -> float:
    """bytes of the copy per key: codes + an fp16 step per key, or an fp16 min and step per channel and block."""
    return D * bits / 8 + (2 if isinstance(grouping, str) else 4 * D / grouping)


def simulate(captured, table: dict) -> dict:
    out = {}
    for name, (bits, grouping) in SCHEMES.items():
        per_layer, missed = [], 0
        for layer, (Q, K) in sorted(captured.items()):
            site = table[f"layer{layer}"]
            lengths, theta = np.asarray(site["threshold_lengths"]), np.asarray(site["thresholds"])
            Hq, (Hkv, T, D) = Q.shape[0], K.shape
            G, rows, scale = Hq // Hkv, Q.shape[1], D ** -0.5
            cand_f, kept_f = [], []
            for g in range(Hkv):
                Kh, err = quantize(K[g], bits, grouping)
                for r in range(rows):
                    n = T - rows + r + 1  # the row's length: it sees keys 0..n-1
                    column = max(0, int(np.searchsorted(lengths, n, side="right")) - 1)
                    cand, kept = np.zeros(n, bool), np.zeros(n, bool)
                    for h in range(g * G, (g + 1) * G):
                        q = Q[h, r]
                        a, ah = scale * (K[g, :n] @ q), scale * (Kh[:n] @ q)
                        bound = scale * (err[:n] @ np.abs(q)) * (1 + 1e-9)
                        keep, maybe = a > theta[h, column], ah + bound > theta[h, column]
                        missed += int((keep & ~maybe).sum())
                        cand |= maybe
                        kept |= keep
                    cand_f.append(cand.mean())
                    kept_f.append(kept.mean())
            per_layer.append({"layer": layer, "candidates": float(np.mean(cand_f)), "kept": float(np.mean(kept_f))})
        cand = float(np.mean([x["candidates"] for x in per_layer]))
        kept = float(np.mean([x["kept"] for x in per_layer]))
        copy = copy_bytes_per_key(bits, grouping, D) / (2 * D)  # relative to the key's fp16 row
        out[name] = {"candidates": cand, "kept": kept, "copy_bytes": copy, "missed": missed,
                     "bytes_now": 1 + kept, "bytes_with_copy": copy + cand + kept,
                     "gain": (1 + kept) / (copy + cand + kept), "per_layer": per_layer}
    return out


def to_markdown(res: dict, args) -> str:
    lines = ["# Low-bit K copy for exact pre-softmax Top-θ decode: simulation on SmolLM2", "",
             f"Command: `python bench/lowbit_k_sim.py {' '.join(sys.argv[1:])}`", "",
             f"{args.rows} decode rows at {args.length} tokens, all 30 layers; bytes relative to reading all of K in fp16 "
             "(per row, the union over a KV group's 3 query heads).", "",
             "| scheme | copy bytes | candidates (K re-read) | kept (V read) | bytes now: K + kept V | bytes with the copy | fewer bytes | kept keys missed |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in res.items():
        lines.append(f"| {name} | {r['copy_bytes']:.3f} | {r['candidates']:.3f} | {r['kept']:.3f} | {r['bytes_now']:.3f} | "
                     f"{r['bytes_with_copy']:.3f} | {r['gain']:.2f}× | {r['missed']} |")
    return "\n".join(lines) + "\n"


def load_sites(path: str) -> dict:
    """A threshold table's sites (.json or .json.gz)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        return json.load(f)["sites"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--table", required=True, help="a pre-softmax threshold table of SmolLM2 (.json or .json.gz)")
    p.add_argument("--length", type=int, default=4000)
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--output", help="write <output>.md and <output>.json")
    args = p.parse_args()
    table = {"sites": load_sites(args.table)}
    if any(s["placement"] != "pre_softmax" for s in table["sites"].values()):
        raise SystemExit(f"{args.table}: expected a pre_softmax table (θ on the raw score)")
    res = simulate(capture_qk(args.length, args.rows, args.seed), table["sites"])
    md = to_markdown(res, args)
    print(md)
    if args.output:
        Path(args.output).with_suffix(".md").write_text(md)
        Path(args.output).with_suffix(".json").write_text(json.dumps({"command": " ".join(sys.argv), "schemes": res}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
