"""Accuracy of Top-θ on SmolLM2-135M in onnxruntime: dense vs Top-θ vs exact top-k, paired.

    python bench/accuracy.py --preset small                   # 40 ARC-Easy questions, k=32 (2 cores: ~10 min)
    python bench/accuracy.py --preset table --workers 16      # top-theta.md's measured table, 400 questions
    python bench/accuracy.py --preset sweep --workers 16      # k sweep, ARC-Easy + HellaSwag + LAMBADA
    python bench/accuracy.py --preset claim --workers 16      # 1000 paired ARC-Easy test questions (+ claim_hellaswag)
    python bench/accuracy.py --preset sweep --prepare         # calibrate + compile once, then shards:
    python bench/accuracy.py --preset sweep --shard 3/16      # one shard (raw records) …
    python -m topt_compile.eval --merge bench/results/accuracy_sweep.shard*of16.json -o bench/results/accuracy_sweep

Writes bench/results/accuracy_<preset>.{md,json,png} (topt_compile/eval.py's report). Each group
of a preset is one (placement, compensation) calibrated on ARC-Challenge 25-shot prompts (24 by
default, as top-theta.md); dense runs once and every variant is paired with it.
"""
import argparse
import dataclasses
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # this checkout's topt_compile, and tests/models.py

from topt_compile.eval import EvalConfig, build_variants, run, run_shard, to_markdown, write_report  # noqa: E402

# (tasks, questions, ks, [(methods, placement, compensation)])
PRESETS = {
    "small": (["arc_easy"], 40, [32], [(["top_theta", "top_k"], "post_softmax", "vmc")]),
    "table": (["arc_easy:test"], 400, [32], [
        (["top_theta"], "post_softmax", "vmc"),
        (["top_theta"], "post_softmax", "none"),
        (["top_theta"], "pre_softmax", "none"),
        (["top_theta"], "pre_softmax", "sdc_exact+vmc"),
        (["top_theta"], "pre_softmax", "sdc_exp_threshold+vmc"),
        (["top_theta"], "pre_softmax", "sdc_calibrated+vmc"),
        (["top_theta"], "pre_softmax", "sdc_exact"),
        (["top_k"], "post_softmax", "vmc"),   # top-k variants take --topk-placement/compensation
    ]),
    "sweep": (["arc_easy", "hellaswag", "lambada"], 1000, [8, 16, 32, 64, 128],
              [(["top_theta", "top_k"], "post_softmax", "vmc")]),
    # The accuracy claim on 16 cores (bench/accuracy_device.sh): 1000 paired questions of ARC-Easy's
    # test split, 500 of HellaSwag; Top-θ over k, exact top-k at the default k (a group's own ks).
    "claim": (["arc_easy:test"], 1000, [16, 32, 64], [
        (["top_theta"], "post_softmax", "vmc"),
        (["top_k"], "post_softmax", "vmc", [32]),
    ]),
    "claim_hellaswag": (["hellaswag"], 500, [32, 64], [
        (["top_theta"], "post_softmax", "vmc"),
        (["top_k"], "post_softmax", "vmc", [32]),
    ]),
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="small")
    p.add_argument("--model", help="exported SmolLM2 .onnx with a KV cache (default: the cached export)")
    p.add_argument("--questions", type=int, help="override the preset's questions per task")
    p.add_argument("--k", help="override the preset's k sweep, e.g. 16,32")
    p.add_argument("--calib-samples", type=int, default=24)
    p.add_argument("--topk-placement", default="pre_softmax")
    p.add_argument("--topk-compensation", default="none")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--shard", default="0/1")
    p.add_argument("--output", help="default bench/results/accuracy_<preset>")
    p.add_argument("--prepare", action="store_true", help="only calibrate and compile the variants (run once before shards)")
    args = p.parse_args()
    tasks, questions, ks, groups = PRESETS[args.preset]
    if args.model is None:
        from models import export_smollm2
        args.model = str(export_smollm2(kv_cache=True))
    output = Path(args.output or ROOT / "bench" / "results" / f"accuracy_{args.preset}")
    i, n = (int(x) for x in args.shard.split("/"))
    base = EvalConfig(model=args.model, tasks=tasks, questions=args.questions or questions,
                      ks=[int(k) for k in args.k.split(",")] if args.k else ks, calib_samples=args.calib_samples,
                      topk_placement=args.topk_placement, topk_compensation=args.topk_compensation,
                      work_dir=str(ROOT / ".cache" / "eval"), workers=args.workers, shard=(i, n))
    raw = {"variants": [], "results": {}}
    for g, (methods, placement, compensation, *group_ks) in enumerate(groups):
        ks_g = base.ks if args.k or not group_ks else group_ks[0]
        config = dataclasses.replace(base, methods=methods, placement=placement, compensation=compensation,
                                     ks=ks_g, dense=g == 0)
        if args.prepare:
            build_variants(config)
            continue
        part = run_shard(config, build_variants(config)) if n > 1 else run(config)
        raw["variants"] += [v for v in part["variants"] if v["name"] not in raw["results"]]
        raw["results"].update(part["results"])
    if args.prepare:
        return 0
    command = "python bench/accuracy.py " + " ".join(sys.argv[1:])
    if n > 1:
        out = output.with_name(f"{output.name}.shard{i}of{n}.json")
        out.write_text(json.dumps(raw))
        print(f"wrote {out}")
        return 0
    summary = write_report(raw, output, command)
    print(to_markdown(summary, raw, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
