"""Where a decode step's host time goes, dense vs Top-θ: onnxruntime's profiler per op type.

    python bench/profile_step.py --dense genai_fp16/ --sparse genai_fp16_topt/ --provider cuda \
        --batch 1 --length 4096 --steps 16

For each model: a prompt of `--length` tokens, then `--steps` profiled decode steps (in-place KV
cache, I/O binding, as bench/generate.py). Per op type: nodes run per step and their host time per
step (on the CUDA EP that is mostly launch work: the GPU runs asynchronously), and the whole
run's wall time per step. Prints a table; --output writes it as JSON too.
"""
import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from topt_compile.generate import InPlaceDecoder  # noqa: E402


def profile(model: Path, provider: str, batch: int, length: int, steps: int) -> dict:
    decoder = InPlaceDecoder(model, provider=provider, batch=batch, max_length=length + steps + 8, profile=True)
    rng = np.random.default_rng(0)
    logits = decoder.step(rng.integers(0, 200, (batch, length)))  # token ids every vocabulary has
    for _ in range(3):  # warm-up steps share the profile: skipped below by run index
        logits = decoder.step(logits.argmax(-1)[:, None])
    for _ in range(steps):
        logits = decoder.step(logits.argmax(-1)[:, None])
    events = json.load(open(decoder.end_profiling()))
    runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])[-steps:]
    first = runs[0]["ts"]
    per_op = defaultdict(lambda: [0, 0.0])
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= first:
            op = e["args"].get("op_name", "?")
            per_op[op][0] += 1
            per_op[op][1] += e["dur"]
    return {"run_ms": float(np.median([r["dur"] for r in runs])) / 1000,
            "ops": {op: {"nodes_per_step": n / steps, "host_ms_per_step": us / steps / 1000}
                    for op, (n, us) in sorted(per_op.items(), key=lambda kv: -kv[1][1])}}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dense", type=Path, required=True)
    ap.add_argument("--sparse", type=Path, required=True)
    ap.add_argument("--provider", default="cuda")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--output", type=Path)
    args = ap.parse_args(argv)
    result = {"command": "python bench/profile_step.py " + " ".join(argv or sys.argv[1:])}
    for name, folder in (("dense", args.dense), ("sparse", args.sparse)):
        model = folder / "model.onnx" if folder.is_dir() else folder
        result[name] = profile(model, args.provider, args.batch, args.length, args.steps)
    print(f"batch {args.batch}, prompt {args.length}: run wall ms/step dense {result['dense']['run_ms']:.2f}, "
          f"sparse {result['sparse']['run_ms']:.2f}")
    print("| model | op | nodes/step | host ms/step |\n|---|---|---|---|")
    for name in ("dense", "sparse"):
        for op, r in result[name]["ops"].items():
            print(f"| {name} | {op} | {r['nodes_per_step']:.0f} | {r['host_ms_per_step']:.3f} |")
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
