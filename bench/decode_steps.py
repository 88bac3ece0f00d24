"""A fixed workload for a kernel profiler: one prompt, then a few greedy decode steps of one model.

    ncu --clock-control none -k regex:DecodeSplitKernel --launch-skip 35 --launch-count 3 \
        python bench/decode_steps.py --model sparse/model.onnx --batch 32 --length 8000 --steps 2

Same prompts and in-place cache as bench/generate.py, so a profiled kernel sees a real model's
cache, thresholds and kept rows (bench/decode_attention.py's nodes see random ones).
"""
import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from generate import prompts  # noqa: E402
from topt_compile.data import Tokenizer  # noqa: E402
from topt_compile.generate import InPlaceDecoder  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="model.onnx of an onnxruntime-genai folder")
    p.add_argument("--provider", default="cuda")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--length", type=int, default=8000)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    prompt = np.asarray(prompts(Tokenizer(args.model.parent), args.batch, args.length, args.seed + args.length), np.int64)
    decoder = InPlaceDecoder(args.model, args.provider, args.batch, args.length + args.steps + 1)
    token = decoder.next_tokens(prompt)[:, None]
    for _ in range(args.steps):
        token = decoder.next_tokens(token)[:, None]
    print("tokens", token[:, 0].tolist())
    return 0


if __name__ == "__main__":
    sys.exit(main())
