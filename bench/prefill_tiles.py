"""How many of a real prompt's tiles would the CUDA prefill kernel skip? Real SmolLM2 Q/K.

    python bench/prefill_tiles.py --table bench/results/t_smollm2_genai_k256_8k_pre.json.gz \
        --length 4000 --output bench/results/prefill_tiles_4k

The kernel (custom_ops/cuda/tt_prefill.cu) skips the P·V work of a warp tile, 16 query rows × 64
keys, in which no row keeps a key. `bench/prefill_attention.py` times it with thresholds set to
skip a target fraction of tiles on random inputs, where kept keys are spread evenly; this script
measures the fraction a real prompt gives: SmolLM2 (transformers, float32) on one ARC prompt of
`--length` tokens (bench/generate.py's prompts), every layer's post-RoPE Q and K, the table's
rule as the op applies it to a prompt without --dense-prompt (rows with n <= k keep every key;
pre-softmax: a > θ(h, n); post-softmax: softmax(a) > θ(h, n)), causal, no past.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from lowbit_k_sim import capture_qk, load_sites  # noqa: E402

WARP_ROWS, TILE_KEYS = 16, 64


def tile_stats(Q, K, site) -> dict:
    """Q [Hq, T, D], K [Hkv, T, D] of one layer → visible warp tiles, those that keep nothing, kept scores."""
    import torch
    Hq, T, D = Q.shape
    G, scale = Hq // K.shape[0], D ** -0.5
    lengths = torch.tensor(site["threshold_lengths"])
    theta = torch.tensor(site["thresholds"], dtype=torch.float64)  # [Hq, L]
    n = torch.arange(1, T + 1)                                     # row i sees keys 0..i
    column = (torch.searchsorted(lengths, n, right=True) - 1).clamp(min=0)
    dense = n <= site["k"]
    visible = torch.arange(T)[None, :] < n[:, None]
    pad = (-T) % TILE_KEYS
    rows_pad = (-T) % WARP_ROWS
    out = {"tiles": 0, "skipped": 0, "kept": 0, "seen": 0}
    for h in range(Hq):
        a = scale * (torch.from_numpy(Q[h]) @ torch.from_numpy(K[h // G]).T)  # [T, T], float64
        a = a.masked_fill(~visible, float("-inf"))
        row_theta = theta[h, column][:, None]
        if site["placement"] == "pre_softmax":
            keep = a > row_theta
        else:
            keep = torch.softmax(a, dim=1) > row_theta
        keep = (keep | dense[:, None]) & visible
        k = torch.nn.functional.pad(keep, (0, pad, 0, rows_pad))
        v = torch.nn.functional.pad(visible, (0, pad, 0, rows_pad))
        shape = (k.shape[0] // WARP_ROWS, WARP_ROWS, k.shape[1] // TILE_KEYS, TILE_KEYS)
        tile_keep = k.view(shape).any(3).any(1)
        tile_vis = v.view(shape).any(3).any(1)
        out["tiles"] += int(tile_vis.sum())
        out["skipped"] += int((tile_vis & ~tile_keep).sum())
        out["kept"] += int(keep.sum())
        out["seen"] += int(visible.sum())
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--table", required=True, help="a SmolLM2 threshold table (.json or .json.gz)")
    p.add_argument("--length", type=int, default=4000)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--output", help="write <output>.md and <output>.json")
    args = p.parse_args()
    sites = load_sites(args.table)
    captured = capture_qk(args.length, args.length, args.seed)
    per_layer = []
    for layer, (Q, K) in sorted(captured.items()):
        s = tile_stats(Q, K, sites[f"layer{layer}"])
        per_layer.append({"layer": layer, "tiles_skipped": s["skipped"] / s["tiles"], "kept": s["kept"] / s["seen"]})
        print(json.dumps(per_layer[-1]), flush=True)
    site0 = sites["layer0"]
    ks = {}
    for name, site in sites.items():
        ks.setdefault(site["k"], []).append(name.removeprefix("layer"))
    k_text = "; ".join(f"k = {k} in layers {', '.join(layers)}" if len(ks) > 1 else f"k = {k}" for k, layers in sorted(ks.items()))
    skipped = float(np.mean([x["tiles_skipped"] for x in per_layer]))
    kept = float(np.mean([x["kept"] for x in per_layer]))
    md = [f"# Prefill tiles a real prompt skips: SmolLM2, {args.length} tokens", "",
          f"Command: `python {' '.join(sys.argv)}`", "",
          f"Table: {site0['placement']}, {k_text} (rows with n <= k keep every key). Warp tiles of "
          f"{WARP_ROWS} rows × {TILE_KEYS} keys; visible tiles only (causal). Mean over the 30 layers: "
          f"**{skipped:.1%} of the tiles keep nothing**, {kept:.2%} of the visible scores are kept.", "",
          "| layer | tiles that keep nothing | scores kept |", "|---|---|---|"]
    md += [f"| {x['layer']} | {x['tiles_skipped']:.1%} | {x['kept']:.2%} |" for x in per_layer]
    md = "\n".join(md) + "\n"
    print(md)
    if args.output:
        Path(args.output).with_suffix(".md").write_text(md)
        Path(args.output).with_suffix(".json").write_text(json.dumps(
            {"command": " ".join(sys.argv), "tiles_skipped": skipped, "kept": kept, "per_layer": per_layer}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
