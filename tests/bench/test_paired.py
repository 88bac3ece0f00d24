"""bench/paired.py: per-round slopes and ratios from interleaved single runs (a fake clock, no GPU)."""
import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("paired", Path(__file__).resolve().parents[2] / "bench" / "paired.py")
_paired = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_paired)
paired_rounds = _paired.paired_rounds


class FakeGpu:
    """A clock that each run advances by fixed + nodes · per_node · (the round's clock factor)."""

    def __init__(self, factors):
        self.now, self.factors, self.runs, self.log = 0.0, factors, 0, []

    def clock(self):
        return self.now

    def runner(self, name, nodes, fixed, per_node):
        gpu = self

        class Runner:
            def run(self):
                gpu.log.append((name, nodes))
                # 3 warm-up runs of each of the 6 runners come first; then 6 timed runs per round
                rnd = max(0, gpu.runs - 18) // 6
                gpu.now += fixed + nodes * per_node * gpu.factors[min(rnd, len(gpu.factors) - 1)]
                gpu.runs += 1
        return Runner()


def test_slopes_remove_the_fixed_cost_and_ratios_cancel_the_rounds_clock():
    factors = [1.0, 1.4, 0.8, 1.2, 1.1]  # the clock differs from round to round, not within one
    gpu = FakeGpu(factors)
    runners = {name: (gpu.runner(name, 1, fixed, per), gpu.runner(name, 5, fixed, per))
               for name, fixed, per in (("sdpa", 0.004, 0.003), ("gqa", 0.010, 0.0036), ("topt", 0.020, 0.002))}
    out = paired_rounds(runners, 1, 5, len(factors), sync=lambda: None, clock=gpu.clock, state=dict)
    assert out["paired_ratio_vs_sdpa"] == pytest.approx(1.5)
    assert out["paired_ratio_vs_gqa"] == pytest.approx(1.8)
    assert out["paired_ratio_vs_sdpa_q1"] == pytest.approx(1.5) and out["paired_ratio_vs_gqa_q3"] == pytest.approx(1.8)
    # per node in ms: the median round's clock factor (1.1) times the per-node time
    assert out["paired_topt_ms"] == pytest.approx(2.0 * 1.1)
    assert out["paired_sdpa_ms"] == pytest.approx(3.0 * 1.1)
    assert len(out["rounds"]) == len(factors)
    # every round runs each n1 runner, then each n2 runner; the first runner rotates
    timed = gpu.log[18:]
    assert [name for name, _ in timed[:6]] == ["sdpa", "gqa", "topt"] * 2
    assert [name for name, _ in timed[6:12]] == ["gqa", "topt", "sdpa"] * 2
    assert [nodes for _, nodes in timed[:6]] == [1, 1, 1, 5, 5, 5]


def test_the_reference_runner_must_be_there():
    with pytest.raises(ValueError, match="topt"):
        paired_rounds({"gqa": (None, None)}, 1, 3, 2, sync=lambda: None)
