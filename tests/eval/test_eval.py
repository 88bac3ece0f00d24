"""Evaluation: paired statistics, scores, kept fractions, KV-cache reuse, top-k variant, shard merging."""
import dataclasses
import math

import numpy as np
import pytest

from models import VOCAB, ExportSpec, export, run_ort
from topt_compile.eval import (Item, Runner, TaskData, Variant, compile_top_k, kept_fractions, merge, paired,
                               question_scores, score_task, summarize, to_markdown)

TINY = ExportSpec("llama", "dynamo", None, "sdpa", True)


def test_paired_difference_and_standard_error_on_a_hand_made_example():
    dense = np.array([1, 1, 0, 0, 1, 0, 1, 1], float)
    sparse = np.array([1, 0, 0, 1, 1, 0, 1, 0], float)  # d = 0, -1, 0, +1, 0, 0, 0, -1
    mean, se = paired(dense, sparse)
    d = np.array([0, -1, 0, 1, 0, 0, 0, -1], float)
    assert mean == pytest.approx(-0.125)
    assert se == pytest.approx(math.sqrt(((d - d.mean()) ** 2).sum() / 7) / math.sqrt(8))
    assert paired(dense, dense) == (0.0, 0.0)


def test_scores_acc_acc_norm_and_gold_margin():
    records = [  # choice 1 has the best total, choice 0 the best per byte
        {"qid": "b", "ll": [-2.0, -1.5, -9.0], "gold": 0, "nbytes": [10, 3, 5], "greedy": [False] * 3, "length": 5},
        {"qid": "a", "ll": [-1.0, -3.0], "gold": 0, "nbytes": [4, 4], "greedy": [True, False], "length": 5},
    ]
    s = question_scores(records, greedy_task=False)
    assert s["qid"] == ["a", "b"]                       # sorted by question id, so variants pair up
    assert s["acc"].tolist() == [1.0, 0.0] and s["acc_norm"].tolist() == [1.0, 1.0]
    assert s["margin"].tolist() == pytest.approx([2.0, -0.5])
    assert s["margin_norm"].tolist() == pytest.approx([0.5, -0.2 + 0.5])
    g = question_scores([{**records[1], "ll": [-1.0], "nbytes": [4], "greedy": [True]}], greedy_task=True)
    assert g["acc"].tolist() == [1.0] and g["margin"].tolist() == [-1.0]


def test_kept_fractions_over_all_rows_and_rows_longer_than_k():
    # one site, 2 heads; 10 rows of which 4 dense (visible 1+2+3+4 = 10 per head)
    stats = [[10, 100, 30, 4, 0, 40], [10, 100, 20, 4, 0, 40]]
    k = kept_fractions({"layer0": {"stats": stats, "dense_visible": 10}})
    assert k["kept"] == pytest.approx(50 / 200) and k["v_rows"] == pytest.approx(80 / 200)
    assert k["kept_long"] == pytest.approx((50 - 20) / (200 - 20))
    assert k["per_layer"]["layer0"]["kept_per_head"] == pytest.approx([0.3, 0.2])


@pytest.fixture(scope="module")
def task():
    rng = np.random.default_rng(3)
    items = [Item(f"q{i}", rng.integers(0, VOCAB, 6).tolist(), [rng.integers(0, VOCAB, n).tolist() for n in (1, 3, 2)],
                  [2, 6, 4], i % 3) for i in range(4)]
    return TaskData("tiny", 2, rng.integers(0, VOCAB, 20).tolist(), items)


def test_choice_log_likelihoods_through_the_reused_prefix_cache_equal_a_full_run(task, topt_library):
    path = export(TINY)
    res = score_task(Runner(Variant("dense", "dense", path=str(path))), task, show=False)
    item, record = task.items[1], res["records"][1]
    for choice, ll in zip(item.choices, record["ll"]):
        ids = np.asarray(task.prefix + item.query + choice)
        S = len(ids)
        feeds = {"input_ids": ids[None], "attention_mask": np.ones((1, S), np.int64), "position_ids": np.arange(S)[None]}
        feeds.update({f"past_key_values.{i}.{kv}": np.zeros((1, 2, 0, 16), np.float32) for i in range(2) for kv in ("key", "value")})
        logits = run_ort(path, feeds)["logits"][0].astype(np.float64)
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
        start = len(task.prefix) + len(item.query)
        want = sum(logp[start - 1 + j, t] for j, t in enumerate(choice))
        assert ll == pytest.approx(want, abs=1e-3)


def test_exact_top_k_variant_keeps_k_per_long_row_and_pairs_with_dense(task, tmp_path, topt_library):
    path = export(TINY)
    out = tmp_path / "topk.onnx"
    site_k = compile_top_k(path, out, 4, {}, "post_softmax", "vmc")
    assert site_k == {"layer0": 4, "layer1": 4}
    dense = score_task(Runner(Variant("dense", "dense", path=str(path))), task, show=False)
    topk = score_task(Runner(Variant("top_k-k4", "top_k", 4, str(out), site_k)), task, show=False)
    st = np.asarray(topk["question_stats"]["layer1"]["stats"])
    assert (st[:, 3] == 0).all()  # every question row sees the 20-token prefix: n > k
    assert (st[:, 2] <= 4 * st[:, 0]).all() and (st[:, 2] >= 3 * st[:, 0]).all()  # exactly k but for ties
    raw = {"variants": [{"name": "dense", "method": "dense", "k": None, "calibrated_max_length": 0, "calibration": {}},
                        {"name": "top_k-k4", "method": "top_k", "k": 4, "calibrated_max_length": 0, "calibration": {}}],
           "results": {"dense": {"tiny": dense}, "top_k-k4": {"tiny": topk}}}
    summary = summarize(raw)
    row = [r for r in summary["rows"] if r["variant"] == "top_k-k4"][0]
    assert row["questions"] == 4 and 0 < row["kept"]["kept"] < 0.5 and len(row["d_acc"]) == 2
    assert "| tiny | top_k-k4 | 4 | 4 |" in to_markdown(summary, raw)

    # two shards merge into the unsharded result (records and stats)
    halves = []
    for i in range(2):
        part = TaskData(task.task, task.shots, task.prefix, task.items[i::2])
        halves.append({"variants": raw["variants"], "results": {
            "top_k-k4": {"tiny": score_task(Runner(Variant("top_k-k4", "top_k", 4, str(out), site_k)), part, show=False)}}})
    merged = merge(halves)["results"]["top_k-k4"]["tiny"]
    assert sorted(r["qid"] for r in merged["records"]) == sorted(r["qid"] for r in topk["records"])
    assert merged["question_stats"]["layer1"]["stats"] == topk["question_stats"]["layer1"]["stats"]


def test_rows_longer_than_the_calibrated_range_are_counted_and_warned_about(task, tmp_path, topt_library):
    from topt_compile.eval import compile_with_stats
    from topt_compile.thresholds.calibrate import calibrate
    path = export(TINY)
    table = calibrate(path, [np.arange(12) % VOCAB, np.arange(16) % VOCAB], k=4, k_layer={}, progress=False,
                      dense_timing=False)
    out = tmp_path / "sparse.onnx"
    compile_with_stats(path, out, table)
    variant = Variant("top_theta", "top_theta", 4, str(out), {s: 4 for s in table.sites}, 16, table.calibration)
    res = score_task(Runner(variant), task, show=False)  # rows see a 20-token prefix and more: all beyond 16
    assert np.asarray(res["question_stats"]["layer0"]["stats"])[:, 4].min() > 0
    raw = {"variants": [dataclasses.asdict(variant)], "results": {"top_theta": {"tiny": res}}}
    raw["variants"].insert(0, {"name": "dense", "method": "dense", "k": None, "calibrated_max_length": 0, "calibration": {}})
    raw["results"]["dense"] = {"tiny": res}
    with pytest.warns(UserWarning, match="longer than calibrated_max_length=16"):
        summary = summarize(raw)
    assert summary["warnings"]
