"""`topt-compile`: argument parsing only; the work is compile.compile_model / compile.list_sites.

    topt-compile model.onnx --thresholds t.json -o sparse.onnx [--report json]
    topt-compile model.onnx --theta -inf -o check.onnx        # uniform θ: dense-equivalent
    topt-compile --list-sites model.onnx [--report json]      # sites, no thresholds needed
    topt-compile genai_folder/ --thresholds t.json -o out_folder/   # an onnxruntime-genai folder
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .compile import CompileOptions, compile_model, list_sites, report_json
from .errors import ToptError
from .frontends import genai
from .ops.schema import PLACEMENTS

PROG = "topt-compile"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Replace the attention of an exported ONNX model "
                                "with ai.topt::TopThetaAttention (Top-θ sparse attention).")
    p.add_argument("model", help="the exported .onnx model or an onnxruntime-genai folder (never modified)")
    p.add_argument("-o", "--output", help="where to write the compiled model (a new folder for a genai folder)")
    p.add_argument("--list-sites", action="store_true", help="list the attention sites and exit (no thresholds needed)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--thresholds", metavar="T.JSON", help="calibrated thresholds (topt-thresholds v1)")
    src.add_argument("--theta", type=float, help="one θ for every head and length, e.g. -inf (dense-equivalent, for checking)")
    p.add_argument("--k", type=int, default=0, help="with --theta: rows with at most k keys stay dense")
    p.add_argument("--placement", choices=PLACEMENTS, default="post_softmax", help="with --theta")
    p.add_argument("--compensation", default="vmc", help="with --theta: none or +-joined vmc, sdc_exact, sdc_exp_threshold")
    p.add_argument("--same-weights", action="store_true", help="the t.json was calibrated on another export of the same "
                   "weights (float32 vs float16, torch export vs genai folder): skip the fingerprint and dtype checks")
    p.add_argument("--dense-prompt", action="store_true", help="keep prompt processing exact (every call with more than "
                   "one query row keeps every key): only decode steps drop keys")
    p.add_argument("--allow-no-sites", action="store_true", help="write the model even if no site matched")
    p.add_argument("--report", choices=("text", "json"), default="text", help="report format on stdout")
    p.add_argument("--no-check", action="store_true", help="skip onnx.checker on the result")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = _negative_values(list(sys.argv[1:] if argv is None else argv))
    args = parser().parse_args(argv)
    try:
        folder = genai.find_folder(args.model)
        if args.list_sites:
            report = list_sites(genai.model_path(folder) if folder else args.model)
        else:
            if not args.output:
                raise ToptError("-o/--output: expected the output path (or --list-sites)")
            if args.thresholds is None and args.theta is None:
                raise ToptError("--thresholds: expected a t.json file, or --theta for uniform thresholds")
            options = CompileOptions(thresholds=args.thresholds, theta=args.theta, k=args.k, placement=args.placement,
                                     compensation=args.compensation, allow_no_sites=args.allow_no_sites,
                                     same_weights=args.same_weights, dense_prompt=args.dense_prompt,
                                     check=not args.no_check)
            if folder and (folder == Path(args.model) or not args.output.endswith(".onnx")):
                report = genai.compile_folder(folder, args.output, options)  # a folder in, a folder out
            else:
                report = compile_model(args.model, args.output, options)
    except ToptError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return e.exit_code
    print(report_json(report) if args.report == "json" else report.to_text())
    return 0


def _negative_values(argv: list[str]) -> list[str]:
    """`--theta -inf` → `--theta=-inf` (argparse takes -inf for an option)."""
    out = []
    for arg in argv:
        if out and out[-1] == "--theta" and arg.startswith("-"):
            out[-1] = f"--theta={arg}"
        else:
            out.append(arg)
    return out


if __name__ == "__main__":
    sys.exit(main())
