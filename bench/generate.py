"""Greedy generation, dense vs Top-θ, in one run: tokens/s, step latency, attention share, agreement.

    python bench/generate.py --dense genai_fp16/ --sparse genai_fp16_topt/ --provider cuda \
        --batches 1,8 --lengths 1024,4096,8000 --new-tokens 32 --output bench/results/generate_h100

Both folders are onnxruntime-genai decoder models (the model builder's GroupQueryAttention model,
and topt-compile's output of it) run through topt_compile.generate.InPlaceDecoder: the KV cache is
one max-length buffer per layer on the device, bound as past and present (I/O binding), only the
last logits come back. Prompts are real text: few-shot ARC-Easy (test split) solved questions up
to the length, then one question; each batch row has its own prompt. Per (batch, length) the two
models alternate `--repeats` times on the same prompts; step latency is the median decode step.
Agreement: a batch row agrees when its first `--agree` greedy tokens equal dense's. The attention
share (with --attention-share, CUDA only) is the GPU time of the attention kernels over all
kernels in a few profiled steps (busy time: the union of kernel intervals; torch.profiler/CUPTI sees
onnxruntime's kernels too).
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from topt_compile.data import Tokenizer, fewshot_prefix, load_questions  # noqa: E402
from topt_compile.generate import InPlaceDecoder  # noqa: E402

# ORT's GroupQueryAttention also runs GetSequenceLengths and UnpackRoPEAppend (rotates and appends the new K/V)
ATTENTION_KERNELS = ("flash", "attention", "attn", "topt", "tt_", "gqa", "splitkv", "fmha", "sequencelengths", "rope")


def prompts(tokenizer: Tokenizer, batch: int, length: int, seed: int) -> np.ndarray:
    """batch prompts of exactly `length` tokens: solved ARC-Easy questions, then one open question."""
    questions = load_questions("arc_easy:test")
    out = []
    for b in range(batch):
        order = np.random.default_rng(seed * 1000 + b).permutation(len(questions))
        asked = tokenizer.encode(questions[order[0]].query)
        need, shots = length - len(asked), 8
        while True:  # about 4 characters a token: grow the shots until they cover the length
            ids = tokenizer.encode(fewshot_prefix([questions[i] for i in order[1:1 + shots]]))
            if len(ids) >= need or shots >= len(order) - 1:
                break
            shots *= 2
        if len(ids) < need:
            raise SystemExit(f"--lengths: {length} tokens is more than the ARC-Easy test questions give")
        out.append(ids[len(ids) - need:] + asked)  # the last shots, cut at a token
    return np.asarray(out, np.int64)


def _union(spans) -> float:
    covered, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b > end:
            covered += b - max(a, end)
            end = b
    return covered


def attention_share(decoder: InPlaceDecoder, prompt: np.ndarray, steps: int = 8) -> dict | None:
    """GPU time of attention kernels / all kernels over `steps` decode steps (None if not measurable)."""
    try:
        import torch
        from torch.profiler import ProfilerActivity, profile
    except ImportError:
        return None
    decoder.reset()
    token = decoder.next_tokens(prompt)[:, None]
    torch.cuda.synchronize() if torch.cuda.is_available() else None
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            token = decoder.next_tokens(token)[:, None]
    spans, attn_spans, names, calls, every = [], [], {}, {}, {}
    for e in sorted((e for e in prof.events() if e.device_type.name == "CUDA"), key=lambda e: e.time_range.start):
        span = (e.time_range.start, e.time_range.end)
        spans.append(span)
        every[e.name[:60]] = every.get(e.name[:60], 0) + span[1] - span[0]
        if any(k in e.name.lower() for k in ATTENTION_KERNELS):
            attn_spans.append(span)
            names[e.name[:60]] = names.get(e.name[:60], 0) + span[1] - span[0]
            calls.setdefault(e.name[:60], []).append(span[1] - span[0])
    # busy time (the union of kernel intervals): PDL lets a kernel start, and wait, while its
    # predecessor runs, so summed durations would count that overlap twice
    total, attn = _union(spans), _union(attn_spans)
    if total == 0:
        return None
    top = sorted(names.items(), key=lambda kv: -kv[1])[:3]
    # a kernel launched the same number of times each step (once per layer): its median µs per call index
    per_call = {n: np.median(np.reshape(calls[n], (steps, -1)), 0).round(1).tolist()
                for n, _ in top if len(calls[n]) % steps == 0}
    return {"share": attn / total, "gpu_ms_per_step": total / steps / 1000, "attention_ms_per_step": attn / steps / 1000,
            "kernels": [[n, round(us / steps / 1000, 4)] for n, us in top],  # name, ms per step (own span)
            "per_layer_us": per_call,
            # every kernel, attention or not: where the rest of the step goes (ms per step, own span)
            "all_kernels": [[n, round(us / steps / 1000, 4)] for n, us in sorted(every.items(), key=lambda kv: -kv[1])[:16]]}


def first_difference(a: np.ndarray, b: np.ndarray) -> int | None:
    diff = np.nonzero(a != b)[0]
    return int(diff[0]) if diff.size else None


def add_comparison_args(p: argparse.ArgumentParser) -> None:
    """The options of a dense-vs-sparse generation run (this script and bench/generate_genai.py)."""
    p.add_argument("--dense", required=True, help="onnxruntime-genai folder (dense)")
    p.add_argument("--sparse", required=True, help="the same folder compiled by topt-compile")
    p.add_argument("--provider", default="cuda", choices=("cpu", "cuda"))
    p.add_argument("--batches", default="1,8")
    p.add_argument("--lengths", default="1024,4096,8000")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--agree", type=int, default=32, help="tokens that must equal dense's for a row to agree")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", help="write <output>.md and <output>.json")


def comparison_row(B: int, L: int, args, res: dict, tokens: dict) -> dict:
    """One (batch, length) result: res[name] = {"steps": [s…], "prefill": [s…]}, tokens[name] [B, new_tokens]."""
    step = {n: float(np.median(r["steps"])) for n, r in res.items()}
    agree = [first_difference(tokens["dense"][b, :args.agree], tokens["sparse"][b, :args.agree]) is None
             for b in range(B)]
    return {"batch": B, "length": L, "new_tokens": args.new_tokens,
            "dense_step_ms": step["dense"] * 1e3, "sparse_step_ms": step["sparse"] * 1e3,
            "dense_tok_s": B / step["dense"], "sparse_tok_s": B / step["sparse"],
            "speedup": step["dense"] / step["sparse"],
            "dense_prefill_s": float(np.median(res["dense"]["prefill"])),
            "sparse_prefill_s": float(np.median(res["sparse"]["prefill"])),
            "agree_rows": int(sum(agree)),
            "first_difference": [first_difference(tokens["dense"][b], tokens["sparse"][b]) for b in range(B)]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_comparison_args(p)
    p.add_argument("--attention-share", action="store_true")
    p.add_argument("--cuda-graph", action="store_true",
                   help="decode steps under onnxruntime's CUDA graphs (enable_cuda_graph), both models")
    args = p.parse_args()
    dense_dir, sparse_dir = Path(args.dense), Path(args.sparse)
    tokenizer = Tokenizer(dense_dir)
    batches = [int(x) for x in args.batches.split(",")]
    lengths = [int(x) for x in args.lengths.split(",")]
    rows = []
    for B in batches:
        max_length = max(lengths) + args.new_tokens
        decoders = {name: InPlaceDecoder(folder / "model.onnx", args.provider, B, max_length,
                                         library=None if name == "dense" else "auto", cuda_graph=args.cuda_graph)
                    for name, folder in (("dense", dense_dir), ("sparse", sparse_dir))}
        for L in lengths:
            prompt = prompts(tokenizer, B, L, args.seed + L)
            res = {name: {"steps": [], "prefill": []} for name in decoders}
            tokens = {}
            for _ in range(args.repeats):
                for name, dec in decoders.items():
                    toks, timing = dec.greedy(prompt, args.new_tokens, prefill_chunk=2048 if B == 1 else None)
                    tokens[name] = toks
                    res[name]["steps"] += timing.step_s
                    res[name]["prefill"].append(timing.prefill_s)
            row = comparison_row(B, L, args, res, tokens) | {"sample": tokenizer.decode(tokens["dense"][0][:24].tolist())}
            if args.attention_share and args.provider == "cuda":
                row["attention"] = {n: attention_share(d, prompt) for n, d in decoders.items()}
            rows.append(row)
            print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
        del decoders
    md = to_markdown(rows, args)
    print(md)
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=1))
        out.with_suffix(".md").write_text(md)
    return 0


def to_markdown(rows, args) -> str:
    lines = [f"# Greedy generation: dense vs Top-θ ({args.provider})", "",
             f"Command: `python bench/generate.py {' '.join(sys.argv[1:])}`", "",
             "| batch | prompt | dense step ms | sparse step ms | dense tok/s | sparse tok/s | speedup | "
             f"rows equal for {args.agree} tokens | first difference per row | attention share dense / sparse |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        share = r.get("attention") or {}
        sh = " / ".join(f"{share[n]['share']:.0%}" if share.get(n) else "n/a" for n in ("dense", "sparse")) if share else "–"
        if share and all(share.get(n) for n in ("dense", "sparse")):
            sh += f" (GPU busy {share['dense']['gpu_ms_per_step']:.2f} / {share['sparse']['gpu_ms_per_step']:.2f} ms)"
        lines.append(f"| {r['batch']} | {r['length']} | {r['dense_step_ms']:.2f} | {r['sparse_step_ms']:.2f} | "
                     f"{r['dense_tok_s']:.0f} | {r['sparse_tok_s']:.0f} | {r['speedup']:.2f}× | "
                     f"{r['agree_rows']}/{r['batch']} | {r['first_difference']} | {sh} |")
    graph = (" Decode steps replay a CUDA graph captured by onnxruntime (enable_cuda_graph; inputs updated in "
             "place, attention mask [B, max_length] as onnxruntime-genai's static buffers).") if args.cuda_graph else ""
    lines += ["", "Step: median wall time of a decode step (one token per row, synchronous run with I/O binding; "
              "the KV cache stays on the device in place; the next tokens are picked where the logits are, "
              f"as onnxruntime-genai's greedy search: B token ids come back).{graph} Prefill is not part of tok/s. "
              f"First difference: index of the first generated token that differs from dense (None: all {args.new_tokens} equal)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
