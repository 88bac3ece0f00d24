"""Greedy generation through onnxruntime-genai's own loop, dense vs Top-θ folders, in one run.

    python bench/generate_genai.py --dense genai_fp16/ --sparse genai_fp16_topt/ \
        --batches 32 --lengths 8000 --new-tokens 64 --cuda-graph --output bench/results/genai_h100

What a deployment engineer runs: `og.Model` on each folder (the sparse one registers topt's library
through its genai_config.json), `og.Generator` with greedy search, `append_tokens(prompt)` then
`generate_next_token()` per token, on the CUDA EP (with `--cuda-graph`, onnxruntime-genai's
`enable_cuda_graph` provider option for both models). onnxruntime-genai keeps the KV cache, the
attention mask and the token pick on the device itself. Step: median time of a
`generate_next_token()` call that runs the model (one token per row); the first call after the
prompt only picks from the prompt's logits and is left out. Prompts and agreement as
bench/generate.py (ARC-Easy few-shot prompts of exactly the length; a row agrees when its first
`--agree` tokens equal dense's). The two models alternate `--repeats` times on the same prompts.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from generate import add_comparison_args, comparison_row, prompts  # noqa: E402
from topt_compile.data import Tokenizer  # noqa: E402


def load_model(og, folder: Path, provider: str, cuda_graph: bool):
    config = og.Config(str(folder))
    if provider == "cuda":
        config.clear_providers()
        config.append_provider("cuda")
        if cuda_graph:
            config.set_provider_option("cuda", "enable_cuda_graph", "1")
    return og.Model(config)


def greedy(og, model, prompt: np.ndarray, new_tokens: int) -> tuple[np.ndarray, float, list[float]]:
    """prompt [B, L] → (tokens [B, new_tokens], prompt seconds, seconds of each model-running step)."""
    B, L = prompt.shape
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=L + new_tokens, batch_size=B, do_sample=False)
    generator = og.Generator(model, params)
    t0 = time.perf_counter()
    generator.append_tokens(prompt.astype(np.int32))
    generator.generate_next_token()  # picks the first token from the prompt's logits
    prefill = time.perf_counter() - t0
    steps = []
    for _ in range(new_tokens - 1):
        t0 = time.perf_counter()
        generator.generate_next_token()
        steps.append(time.perf_counter() - t0)
    tokens = np.stack([np.asarray(generator.get_sequence(b))[L:L + new_tokens] for b in range(B)])
    del generator
    return tokens, prefill, steps


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_comparison_args(p)
    p.add_argument("--cuda-graph", action="store_true", help="onnxruntime-genai's enable_cuda_graph, both models")
    args = p.parse_args(argv)
    command = " ".join(argv if argv is not None else sys.argv[1:])
    import onnxruntime_genai as og

    dense_dir, sparse_dir = Path(args.dense), Path(args.sparse)
    tokenizer = Tokenizer(dense_dir)
    models = {name: load_model(og, folder, args.provider, args.cuda_graph)
              for name, folder in (("dense", dense_dir), ("sparse", sparse_dir))}
    rows = []
    for B in (int(x) for x in args.batches.split(",")):
        for L in (int(x) for x in args.lengths.split(",")):
            prompt = prompts(tokenizer, B, L, args.seed + L)
            res = {name: {"steps": [], "prefill": []} for name in models}
            tokens = {}
            for _ in range(args.repeats):
                for name, model in models.items():
                    tokens[name], prefill, steps = greedy(og, model, prompt, args.new_tokens)
                    res[name]["steps"] += steps
                    res[name]["prefill"].append(prefill)
            row = comparison_row(B, L, args, res, tokens)
            rows.append(row)
            print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
    md = to_markdown(rows, args, command)
    print(md)
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps({"command": "python bench/generate_genai.py " + command, "rows": rows}, indent=1))
        out.with_suffix(".md").write_text(md)
    return 0


def to_markdown(rows, args, command: str) -> str:
    lines = [f"# Greedy generation through onnxruntime-genai: dense vs Top-θ ({args.provider}"
             f"{', CUDA graph' if args.cuda_graph else ''})", "",
             f"Command: `python bench/generate_genai.py {command}`", "",
             f"| batch | prompt | dense step ms | sparse step ms | dense tok/s | sparse tok/s | speedup | "
             f"rows equal for {args.agree} tokens | first difference per row |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['length']} | {r['dense_step_ms']:.2f} | {r['sparse_step_ms']:.2f} | "
                     f"{r['dense_tok_s']:.0f} | {r['sparse_tok_s']:.0f} | {r['speedup']:.2f}× | "
                     f"{r['agree_rows']}/{r['batch']} | {r['first_difference']} |")
    lines += ["", "Step: median time of onnxruntime-genai's `generate_next_token()` when it runs the model (one "
              "token per row; KV cache, attention mask and token pick on the device, as onnxruntime-genai does "
              "them). Prefill is not part of tok/s. First difference: index of the first generated token that "
              "differs from dense (None: all equal)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
