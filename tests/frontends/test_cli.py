"""topt-compile / compile_model: reports, t.json fit errors, no-site handling, atomic writes."""
import hashlib
import json
import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto as TP
from onnx import helper as oh

from models import LAYERS, ExportSpec, assert_outputs_close, export, make_feeds, run_ort, run_reference
from topt_compile import compile as compile_mod
from topt_compile.cli import main
from topt_compile.compile import compile_model, list_sites
from topt_compile.errors import NoSitesError, ThresholdsError, ToptError
from topt_compile.thresholds.schema import ThresholdTable

SPEC = ExportSpec("llama", "dynamo", None, "sdpa", True)  # GQA + KV cache


@pytest.fixture(scope="module")
def model():
    return export(SPEC)


def _sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _table(model, theta=0.05) -> ThresholdTable:
    report = list_sites(model)
    table = ThresholdTable.uniform(report.fingerprint, report.sites, theta)
    for t in table.sites.values():  # two columns, per-head values: exercises the [Hq, L] layout
        t.threshold_lengths = [0, 8]
        t.thresholds = [[theta * (1 + h / 10), theta] for h in range(t.Hq)]
    return table


def test_list_sites_prints_every_site_without_thresholds(model, capsys):
    assert main(["--list-sites", str(model), "--report", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [s["id"] for s in report["sites"]] == [f"layer{i}" for i in range(LAYERS)]
    assert report["matched"] == LAYERS and report["sites"][0]["Hkv"] == 2


def test_compile_with_a_t_json_writes_a_checked_model_and_leaves_the_input_alone(model, tmp_path, capsys):
    before = _sha(model)
    _table(model).save(tmp_path / "t.json")
    out = tmp_path / "sparse.onnx"
    assert main([str(model), "--thresholds", str(tmp_path / "t.json"), "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "2 of 2 attention sites matched" in text and "layer1" in text
    assert _sha(model) == before
    proto = onnx.load(out)
    onnx.checker.check_model(proto, full_check=True)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    assert inits["topt.layer0.thresholds"].shape == (4, 2) and inits["topt.layer0.thresholds"].dtype == np.float32
    assert inits["topt.layer0.threshold_lengths"].tolist() == [0, 8]
    assert any(o.domain == "ai.topt" and o.version == 1 for o in proto.opset_import)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["sparse.onnx", "t.json"]  # no temp files left


def test_theta_minus_inf_on_the_command_line_gives_the_dense_model(model, tmp_path, capsys):
    out = tmp_path / "dense.onnx"
    assert main([str(model), "--theta", "-inf", "-o", str(out), "--report", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["matched"] == LAYERS
    feeds = make_feeds(SPEC)
    assert_outputs_close(feeds, run_ort(model, feeds), run_reference(out, feeds), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("field, edit", [
    ("sites.layer0.Hq", lambda d: d["sites"]["layer0"].update(Hq=8, thresholds=[[0.1]] * 8, threshold_lengths=[0])),
    ("sites.layer0.Hkv", lambda d: d["sites"]["layer0"].update(Hkv=4)),
    ("model.fingerprint", lambda d: d["model"].update(fingerprint="0000")),
    ("sites.layer7", lambda d: d["sites"].update(layer7=d["sites"]["layer0"])),
    ("sites.layer1", lambda d: d["sites"].pop("layer1")),
    ("sites.layer0.dtype", lambda d: d["sites"]["layer0"].update(dtype="float16")),
    ("sites.layer0.thresholds[1]", lambda d: d["sites"]["layer0"]["thresholds"][1].append(0.1)),
    ("sites.layer0.threshold_lengths", lambda d: d["sites"]["layer0"].update(threshold_lengths=[8, 0])),
    ("sites.layer0.compensation", lambda d: d["sites"]["layer0"].update(compensation="sdc_exact")),
    ("version", lambda d: d.update(version=2)),
])
def test_a_t_json_that_does_not_fit_is_a_one_line_error_naming_the_field(model, tmp_path, capsys, field, edit):
    data = _table(model).to_json()
    edit(data)
    (tmp_path / "t.json").write_text(json.dumps(data))
    out = tmp_path / "sparse.onnx"
    code = main([str(model), "--thresholds", str(tmp_path / "t.json"), "-o", str(out)])
    err = capsys.readouterr().err
    assert code == ThresholdsError.exit_code and code != 0
    assert len(err.strip().splitlines()) == 1 and f"{field}:" in err, err
    assert not out.exists() and sorted(f.name for f in tmp_path.iterdir()) == ["t.json"]


def _not_attention(path):
    nodes = [oh.make_node("MatMul", ["X", "W"], ["L"]), oh.make_node("Softmax", ["L"], ["Y"], axis=-1)]
    g = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("X", TP.FLOAT, (2, 4))],
                      [oh.make_tensor_value_info("Y", TP.FLOAT, (2, 4))],
                      [onnx.numpy_helper.from_array(np.ones((4, 4), np.float32), "W")])
    onnx.save(oh.make_model(g, opset_imports=[oh.make_opsetid("", 20)]), path)
    return path


def test_zero_matched_sites_is_an_error_unless_allowed(tmp_path, capsys):
    src = _not_attention(tmp_path / "mlp.onnx")
    out = tmp_path / "out.onnx"
    assert main([str(src), "--theta", "-inf", "-o", str(out)]) == NoSitesError.exit_code
    assert "no attention site matched" in capsys.readouterr().err and not out.exists()
    assert main([str(src), "--theta", "-inf", "-o", str(out), "--allow-no-sites"]) == 0
    assert out.exists()


def test_a_failed_write_leaves_neither_output_nor_temp_files(model, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(compile_mod.onnx.checker, "check_model", boom)
    with pytest.raises(Exception):
        compile_model(model, tmp_path / "sparse.onnx", theta=-math.inf)
    assert list(tmp_path.iterdir()) == []


def test_large_models_are_written_with_external_data_beside_the_output(model, tmp_path, monkeypatch):
    monkeypatch.setattr(compile_mod, "EXTERNAL_DATA_ABOVE", 0)  # take the >2 GB path on a small model
    out = tmp_path / "sub" / "sparse.onnx"
    compile_model(model, out, theta=-math.inf)
    assert sorted(f.name for f in out.parent.iterdir()) == ["sparse.onnx", "sparse.onnx.data"]
    feeds = make_feeds(SPEC)
    assert_outputs_close(feeds, run_ort(model, feeds), run_reference(out, feeds), rtol=1e-4, atol=1e-4)


def test_output_equal_to_input_is_refused(model, capsys):
    assert main([str(model), "--theta", "-inf", "-o", str(model)]) != 0
    assert "overwrite the input" in capsys.readouterr().err


def test_a_failure_while_moving_the_file_into_place_cleans_up(model, tmp_path, monkeypatch):
    def fail(*a, **k):
        raise OSError("cross-device link")
    monkeypatch.setattr(compile_mod.os, "replace", fail)
    with pytest.raises(ToptError, match="cannot write"):
        compile_model(model, tmp_path / "sparse.onnx", theta=-math.inf)
    assert list(tmp_path.iterdir()) == []
