"""Stall samples of a kernel's SASS (an `ncu --page source --csv --print-source sass` export) by
region: the prologue before the tile loop, the loop, the epilogue after it. The loop is the span of
instructions executed more than `--hot` times (default: 3x the most common count, i.e. more often
than once per warp). `--by-opcode N` adds the samples per opcode (with each one's top reasons) and
the N instructions with the most samples.

    python bench/cuda/sass_regions.py ncu_b1/sass_1_32_32768_DecodeSplitKernel.csv [--loop ROW:ROW] [--by-opcode 30]
"""
import argparse
import collections
import csv


def number(text: str) -> float:
    text = text.replace(",", "")
    try:
        return float(text)
    except ValueError:
        return 0.0


def busiest_section(path: str) -> tuple[str, list[str], list[list[str]]]:
    """The export holds one section per kernel launch: the one with the most samples."""
    rows = list(csv.reader(open(path)))
    starts = [i for i, r in enumerate(rows) if r and r[0] == "Kernel Name"] + [len(rows)]
    best = None
    for a, b in zip(starts, starts[1:]):
        header, data = rows[a + 1], [r for r in rows[a + 2:b] if len(r) > 2]
        col = header.index("Warp Stall Sampling (All Samples)")
        total = sum(number(r[col]) for r in data)
        if best is None or total > best[0]:
            best = (total, rows[a][1], header, data)
    return best[1], best[2], best[3]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("csv")
    ap.add_argument("--loop", help="ROW:ROW, the loop's rows (else found from the execution counts)")
    ap.add_argument("--by-opcode", type=int, default=0, metavar="N", help="also per opcode, and the top N instructions")
    args = ap.parse_args()
    name, header, data = busiest_section(args.csv)
    col = {h: i for i, h in enumerate(header)}
    stalls = [h for h in header if h.startswith("stall_") and "Not Issued" not in h]
    samples = [number(r[col["Warp Stall Sampling (All Samples)"]]) for r in data]
    executed = [number(r[col["Instructions Executed"]]) for r in data]
    if args.loop:
        lo, hi = (int(x) for x in args.loop.split(":"))
    else:
        once = collections.Counter(int(e) for e in executed if e > 0).most_common(1)[0][0]
        hot = [i for i, e in enumerate(executed) if e > 3 * once]
        lo, hi = hot[0], hot[-1] + 1
    total = sum(samples)
    print(f"{name[:120]}\n{len(data)} instructions, {total:.0f} stall samples, loop rows {lo}:{hi}")
    for region, a, b in (("prologue", 0, lo), ("loop", lo, hi), ("epilogue", hi, len(data))):
        s = sum(samples[a:b])
        by_reason = {h[6:]: sum(number(r[col[h]]) for r in data[a:b]) for h in stalls}
        top = sorted(by_reason.items(), key=lambda kv: -kv[1])[:6]
        ran = sum(1 for e in executed[a:b] if e > 0)
        print(f"  {region:9s} {s:6.0f} samples ({100 * s / max(total, 1):4.1f}%), {ran:5d} instructions ran: "
              + ", ".join(f"{k} {v:.0f}" for k, v in top))
    if args.by_opcode:
        print_by_opcode(header, data, samples, stalls, args.by_opcode)


def reasons(row: list[str], col: dict[str, int], stalls: list[str]) -> collections.Counter:
    return collections.Counter({h[6:]: number(row[col[h]]) for h in stalls})


def print_by_opcode(header: list[str], data: list[list[str]], samples: list[float], stalls: list[str], top_n: int) -> None:
    """Samples per opcode (predicates and modifiers dropped), then the busiest instructions."""
    col = {h: i for i, h in enumerate(header)}
    total = max(sum(samples), 1)
    per_op, per_op_reason = collections.Counter(), collections.defaultdict(collections.Counter)
    for row, s in zip(data, samples):
        words = [w for w in row[col["Source"]].split() if not w.startswith("@")]
        op = words[0].split(".")[0] if words else "?"
        per_op[op] += s
        per_op_reason[op] += reasons(row, col, stalls)
    print("by opcode:")
    for op, s in per_op.most_common(18):
        top = ", ".join(f"{k} {100 * v / max(s, 1):.0f}%" for k, v in per_op_reason[op].most_common(3))
        print(f"  {op:12s} {s:7.0f} ({100 * s / total:4.1f}%): {top}")
    print(f"the {top_n} instructions with the most samples:")
    for i in sorted(range(len(data)), key=lambda i: -samples[i])[:top_n]:
        row = data[i]
        top = ", ".join(f"{k} {v:.0f}" for k, v in reasons(row, col, stalls).most_common(3) if v)
        print(f"  row {i:5d} {samples[i]:6.0f} ({100 * samples[i] / total:4.1f}%) x{row[col['Instructions Executed']]:>8s} "
              f"{row[col['Source']][:60]:60s} {top}")


if __name__ == "__main__":
    main()
