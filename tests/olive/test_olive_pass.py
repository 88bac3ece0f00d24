"""The Olive pass: a workflow (and the pass run as Olive runs it) gives what compile_model gives."""
import json
import math
import runpy
import sys
import warnings

import numpy as np
import pytest

pytest.importorskip("olive", reason="olive-ai is not installed (pip install \"topt[olive]\" or olive-ai==0.13.0)")

from olive.hardware import DEFAULT_CPU_ACCELERATOR  # noqa: E402
from olive.model import ONNXModelHandler  # noqa: E402
from olive.package_config import OlivePackageConfig  # noqa: E402

from models import ExportSpec, export, make_feeds, run_ort  # noqa: E402
from topt_compile.compile import compile_model, list_sites  # noqa: E402
from topt_compile.errors import ThresholdsError  # noqa: E402
from topt_compile.olive_pass import PASS_NAME, TopThetaCompile, package_config  # noqa: E402
from topt_compile.thresholds.schema import ThresholdTable  # noqa: E402

SPEC = ExportSpec("llama", "dynamo", None, "sdpa", True)


@pytest.fixture(autouse=True)
def no_telemetry(monkeypatch):
    # Olive 0.13 sends telemetry unless it sees a CI: without a network its exit then waits for timeouts
    monkeypatch.setenv("OLIVE_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("CI", "1")


@pytest.fixture(scope="module")
def t_json(tmp_path_factory):
    report = list_sites(export(SPEC))
    path = tmp_path_factory.mktemp("olive") / "t.json"
    ThresholdTable.uniform(report.fingerprint, report.sites, 0.05).save(path)
    return path


def _same_outputs(a, b, library):
    feeds = make_feeds(SPEC)
    want, got = run_ort(a, feeds, library), run_ort(b, feeds, library)
    assert want.keys() == got.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_a_workflow_with_a_t_json_gives_the_model_compile_model_gives(t_json, tmp_path, topt_library):
    from olive.workflows import run
    workflow = {"input_model": {"type": "ONNXModel", "model_path": str(export(SPEC))},
                "passes": {"sparsify": {"type": PASS_NAME, "thresholds": str(t_json)}},
                "cache_dir": str(tmp_path / "cache"), "output_dir": str(tmp_path / "out"),
                "evaluate_input_model": False, "log_severity_level": 3}
    output = run(workflow, package_config=package_config())
    compiled = output.get_best_candidate().model_path
    compile_model(export(SPEC), tmp_path / "direct.onnx", thresholds=t_json)
    assert open(compiled, "rb").read() == open(tmp_path / "direct.onnx", "rb").read()
    _same_outputs(tmp_path / "direct.onnx", compiled, topt_library)


def _run_pass(config, model, out):
    """What Olive's engine does: validate the config, make the pass, run it on a model handler."""
    pass_config = TopThetaCompile.generate_config(DEFAULT_CPU_ACCELERATOR, config, disable_search=True)
    return TopThetaCompile(DEFAULT_CPU_ACCELERATOR, pass_config).run(ONNXModelHandler(model_path=str(model)), str(out))


def test_the_pass_with_a_uniform_theta_equals_compile_model(tmp_path, topt_library):
    result = _run_pass({"theta": "-inf", "k": 4, "placement": "pre_softmax", "compensation": "none"},
                       export(SPEC), tmp_path / "olive_out")
    assert isinstance(result, ONNXModelHandler) and result.model_path == str(tmp_path / "olive_out" / export(SPEC).name)
    compile_model(export(SPEC), tmp_path / "direct.onnx", theta=-math.inf, k=4, placement="pre_softmax",
                  compensation="none")
    _same_outputs(tmp_path / "direct.onnx", result.model_path, topt_library)


def test_a_pass_without_thresholds_fails_with_the_one_line_error(tmp_path):
    with pytest.raises(ThresholdsError, match="thresholds: expected exactly one of a t.json file and a uniform theta"):
        _run_pass({}, export(SPEC), tmp_path / "olive_out")
    assert not list(tmp_path.rglob("*.onnx"))


def test_the_package_config_adds_the_pass_to_olives_own(tmp_path, monkeypatch, capsys):
    out = tmp_path / "topt_olive_config.json"
    monkeypatch.setattr(sys, "argv", ["olive_pass", str(out)])  # python -m topt_compile.olive_pass OUT.json
    with warnings.catch_warnings():  # runpy: the module is already imported (by this test file)
        warnings.simplefilter("ignore", RuntimeWarning)
        runpy.run_module("topt_compile.olive_pass", run_name="__main__")
    assert f"--package-config {out}" in capsys.readouterr().out
    config = OlivePackageConfig.parse_file_or_obj(json.loads(out.read_text()))
    assert config.import_pass_module(PASS_NAME) is TopThetaCompile
    assert "onnxscriptfusion" in config.passes  # Olive's passes are still there
