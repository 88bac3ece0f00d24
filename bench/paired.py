"""Paired rounds: kernels timed in interleaved single runs, so that each round's times see one clock.

An H100 running attention kernels can sit at its 700 W power cap, its SM clock swinging between about
1.35 and 1.9 GHz over a second or so; two kernels timed in blocks a few hundred ms apart then see
different clocks. Here every runner does one run of n1 nodes and one of n2 nodes per round, all of
them interleaved (the order rotates from round to round), and each round gives every runner's slope
(t(n2) − t(n1)) / (n2 − n1): its time per node without the fixed cost of a run. The ratios to one
runner (`versus`) are taken within a round; their median and quartiles are reported.
"""
from __future__ import annotations

import statistics
import time


def gpu_state() -> dict:
    """The SM clock (MHz) and power (W) now, from NVML where torch can reach it (else empty)."""
    try:
        import torch
        return {"sm_mhz": torch.cuda.clock_rate(), "watts": torch.cuda.power_draw() / 1000}
    except Exception:  # noqa: BLE001 — no NVML binding: the rounds are still paired
        return {}


def cuda_sync():
    import torch
    torch.cuda.synchronize()


def paired_rounds(runners: dict, n1: int, n2: int, rounds: int, versus: str = "topt",
                  sync=cuda_sync, clock=time.perf_counter, state=gpu_state, warmup: int = 3) -> dict:
    """runners: name → (runner of n1 nodes, runner of n2 nodes), each with .run(). Returns, per other
    runner X: paired_X_ms (median slope, ms per node), paired_ratio_vs_X (median over rounds of
    X's slope / versus's slope) with _q1 and _q3; paired_<versus>_ms; and every round's slopes."""
    names = list(runners)
    if versus not in names or len(names) < 2:
        raise ValueError(f"paired_rounds: need {versus!r} and at least one other runner, got {names}")

    def once(runner):
        sync()
        start = clock()
        runner.run()
        sync()
        return clock() - start

    for pair in runners.values():
        for runner in pair:
            for _ in range(warmup):
                runner.run()
    per_round = []
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        t = {}
        for i in (0, 1):
            for name in order:
                t[name, i] = once(runners[name][i])
        ms = {name: (t[name, 1] - t[name, 0]) / (n2 - n1) * 1e3 for name in names}
        per_round.append({f"{name}_ms": v for name, v in ms.items()}
                         | {f"ratio_vs_{name}": ms[name] / ms[versus] for name in names if name != versus} | state())
    out = {f"paired_{versus}_ms": statistics.median(x[f"{versus}_ms"] for x in per_round)}
    for name in names:
        if name == versus:
            continue
        ratios = [x[f"ratio_vs_{name}"] for x in per_round]
        quart = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        out |= {f"paired_{name}_ms": statistics.median(x[f"{name}_ms"] for x in per_round),
                f"paired_ratio_vs_{name}": statistics.median(ratios),
                f"paired_ratio_vs_{name}_q1": quart[0], f"paired_ratio_vs_{name}_q3": quart[2]}
    return out | {"paired_rounds": rounds, "rounds": per_round}
