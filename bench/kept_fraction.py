"""What a compiled model really keeps while decoding: kept elements and V rows per layer, real prompts.

    python bench/kept_fraction.py --model genai-fp32-cpu/ --thresholds t.json --same-weights \
        --dense-prompt --length 8000 --steps 4 --output bench/results/kept_...

Compiles the folder's model with each TopThetaAttention's `stats` exposed (a temporary copy), runs
an ARC prompt of `--length` tokens (bench/generate.py's prompts), then `--steps` greedy decode steps
with the in-place cache, and sums the decode steps' stats per layer: the kept fraction of visible
elements and the fraction of V rows read (the union over a KV group's query heads — what the CUDA
kernel gathers). The decode kernel's time follows the V-row fraction; bench/decode_attention.py
times it at set fractions. CPU by default (the stats are the op's contract, the same on every EP).
"""
import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from generate import prompts  # noqa: E402
from topt_compile.data import Tokenizer  # noqa: E402
from topt_compile.eval import kept_fractions  # noqa: E402
from topt_compile.frontends.genai import compile_folder  # noqa: E402
from topt_compile.generate import InPlaceDecoder  # noqa: E402


def decode_stats(model: Path, provider: str, prompt: np.ndarray, steps: int) -> dict:
    """Per site: the stats [Hq, 6] summed over `steps` decode steps after `prompt`."""
    decoder = InPlaceDecoder(model, provider, prompt.shape[0], prompt.shape[1] + steps + 1)
    names = [o.name for o in decoder.session.get_outputs() if o.name.endswith(".stats")]
    for name in names:
        decoder.binding.bind_output(name, "cpu")
    token = decoder.next_tokens(prompt)[:, None]
    sums = {}
    for _ in range(steps):
        token = decoder.next_tokens(token)[:, None]
        outs = dict(zip([o.name for o in decoder.session.get_outputs()], decoder.binding.get_outputs()))
        for name in names:
            site = name.removeprefix("topt.").removesuffix(".stats")
            sums[site] = sums.get(site, 0) + outs[name].numpy().sum(0)  # over the batch
    return sums


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="an onnxruntime-genai folder (dense)")
    p.add_argument("--thresholds", required=True)
    p.add_argument("--same-weights", action="store_true")
    p.add_argument("--dense-prompt", action="store_true")
    p.add_argument("--provider", default="cpu")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--length", type=int, default=8000)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", help="write <output>.json")
    args = p.parse_args()
    folder = Path(args.model)
    prompt = np.asarray(prompts(Tokenizer(folder), args.batch, args.length, args.seed + args.length), np.int64)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "stats"
        compile_folder(folder, out, thresholds=args.thresholds, same_weights=args.same_weights,
                      dense_prompt=args.dense_prompt, stats=True)
        sums = decode_stats(out / "model.onnx", args.provider, prompt, args.steps)
    # kept_fractions wants per-question stats and the dense rows' visible count: none are dense here
    kept = kept_fractions({site: {"stats": s.tolist(), "dense_visible": 0} for site, s in sums.items()})
    print(f"{args.length} tokens, B={args.batch}, {args.steps} decode steps: kept {kept['kept']:.4f} of visible "
          f"elements, V rows read {kept['v_rows']:.4f}")
    for site, f in kept["per_layer"].items():
        print(f"  {site}: kept {f['kept']:.4f}  V rows {f['v_rows']:.4f}")
    if args.output:
        Path(args.output).with_suffix(".json").write_text(json.dumps({"command": " ".join(sys.argv), **kept}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
