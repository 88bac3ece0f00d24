"""Where an attention site's time goes inside a real decode step (CUDA, CUDA-graph replays).

    python bench/step_timeline.py genai_fp16_topt/ --batch 32 --length 8000 [--library auto|none]

Runs a prompt of `--length` tokens (bench/generate.py's ARC prompts), a few warm-up steps, then
profiles `--steps` decode steps with torch.profiler (CUPTI sees onnxruntime's kernels, graph
replays included). Consecutive attention kernels (bench/generate.py's ATTENTION_KERNELS; one
kernel shorter than 2 µs between two of them counts too) form a site; per site it reports the gap from the kernel before, the site's span (first start to last
end: with PDL a kernel may start before its predecessor ends), the gap to the kernel after, and per
kernel its start within the site and its duration — medians over every site of every step, µs.
"""
import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from generate import ATTENTION_KERNELS, prompts  # noqa: E402
from topt_compile.data import Tokenizer  # noqa: E402
from topt_compile.generate import InPlaceDecoder  # noqa: E402


def kernel_spans(folder: Path, library: str | None, batch: int, length: int, steps: int) -> list[tuple]:
    import torch
    from torch.profiler import ProfilerActivity, profile
    decoder = InPlaceDecoder(folder / "model.onnx", "cuda", batch, length + steps + 16, library=library, cuda_graph=True)
    token = decoder.next_tokens(prompts(Tokenizer(folder), batch, length, length))[:, None]
    for _ in range(6):  # the first steps warm up and capture the graph
        token = decoder.next_tokens(token)[:, None]
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            token = decoder.next_tokens(token)[:, None]
    return sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events() if e.device_type.name == "CUDA")


def short(name: str) -> str:
    name = name.replace("(anonymous namespace)::", "").split("(")[0].split("<")[0]
    return name.split("::")[-1][:40]


def site_timeline(spans: list[tuple]) -> dict:
    is_attention = [any(k in n.lower() for k in ATTENTION_KERNELS) for _, _, n in spans]
    stats = defaultdict(list)
    i = 0
    while i < len(spans):
        if not is_attention[i]:
            i += 1
            continue
        j = i
        while j + 1 < len(spans):
            if is_attention[j + 1]:
                j += 1
            elif j + 2 < len(spans) and is_attention[j + 2] and spans[j + 1][1] - spans[j + 1][0] < 2.0:
                j += 2  # one short helper kernel inside the site (ORT's GQA fills an int buffer before its flash kernel)
            else:
                break
        if 0 < i and j + 1 < len(spans):  # a whole site, with a kernel before and after it
            site = spans[i:j + 1]
            start, end = min(a for a, _, _ in site), max(b for _, b, _ in site)
            stats["gap from the kernel before"].append(start - spans[i - 1][1])
            stats["site span"].append(end - start)
            stats["gap to the kernel after"].append(spans[j + 1][0] - end)
            for a, b, n in site:
                stats[f"{short(n)}: start in site"].append(a - start)
                stats[f"{short(n)}: duration"].append(b - a)
        i = j + 1
    return {k: round(float(np.median(v)), 1) for k, v in stats.items()} | {"sites": len(stats["site span"])}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path, help="onnxruntime-genai folder (dense or compiled)")
    ap.add_argument("--library", default="auto", help="topt's library: auto, none (a dense folder) or a path")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--length", type=int, default=8000)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--output", type=Path, help="write the result as JSON")
    args = ap.parse_args(argv)
    library = None if args.library == "none" else args.library
    result = site_timeline(kernel_spans(args.folder, library, args.batch, args.length, args.steps))
    for k, v in result.items():
        print(f"{k:50s} {v}")
    if args.output:
        args.output.write_text(json.dumps({"command": "python bench/step_timeline.py " + " ".join(argv or sys.argv[1:]),
                                           "median_us": result}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
