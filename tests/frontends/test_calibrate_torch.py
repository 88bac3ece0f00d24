"""Calibration in torch (thresholds/calibrate_torch.py) against the ONNX route: the dense export with
every site replaced by ai.topt::TopThetaCalibrate, run in onnxruntime on the same data."""
import math

import numpy as np
import onnx_ir as ir
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from models import LAYERS, ExportSpec, build_model, export, make_feeds, run_ort  # noqa: E402
from test_fx import _calibration_batches  # noqa: E402
from topt_compile.frontends import onnx as onnx_frontend  # noqa: E402
from topt_compile.match import find_sites  # noqa: E402
from topt_compile.ops import schema  # noqa: E402
from topt_compile.ops.calibrate_reference import sdc_log_mass_from_sums, thresholds_from_sums  # noqa: E402
from topt_compile.rewrite.insert_top_theta import _initializer, _take_over  # noqa: E402
from topt_compile.thresholds.calibrate_torch import calibrate  # noqa: E402
from topt_compile.thresholds.schema import ThresholdTable  # noqa: E402

SPEC = ExportSpec("llama", "dynamo", None, "sdpa", True)  # GQA, KV cache, left padding


def _onnx_calibration_sums(path, feeds, lengths, ks, placement, compensation, library):
    """theta_sums and sdc_sums per site from the dense export with TopThetaCalibrate at each site."""
    model = onnx_frontend.load(path)
    graph = model.graph
    position = {id(n): i for i, n in enumerate(graph)}
    sites = [s for s in find_sites(model) if s.matched]
    for site, k in zip(sites, ks):
        anchor = site.output.producer()
        attrs = schema.Attributes(scale=site.scale, is_causal=site.is_causal, k=k, placement=placement,
                                  compensation=compensation).onnx_attributes()
        attrs = {a: v for a, v in attrs.items() if a in schema.CALIBRATE_ATTRIBUTES}
        inputs = [site.query, site.key, site.value, site.attn_mask, site.past_key, site.past_value,
                  _initializer(graph, f"cal.{site.id}.lengths", np.asarray(lengths, np.int64))]
        node = ir.Node(schema.DOMAIN, schema.CALIBRATE_OP_TYPE, inputs, ir.convenience.convert_attributes(attrs),
                       num_outputs=5, name=f"cal/{site.id}", version=schema.OPSET_VERSION)
        for value, name in zip(node.outputs, schema.CALIBRATE_OUTPUTS):
            value.name = f"cal.{site.id}.{name}"
        graph.insert_before(anchor, node)
        at = position[id(anchor)]
        _take_over(graph, site.output, node.outputs[0], position, at, everywhere=True)
        if site.present_key is not None:
            _take_over(graph, site.present_key, node.outputs[1], position, at, everywhere=False)
            _take_over(graph, site.present_value, node.outputs[2], position, at, everywhere=False)
        graph.outputs.extend(node.outputs[3:5])
    for opsets in (model.opset_imports, graph.opset_imports):
        opsets[schema.DOMAIN] = schema.OPSET_VERSION
    out = run_ort(ir.serde.serialize_model(model), feeds, library)
    return {s.id: (out[f"cal.{s.id}.theta_sums"], out[f"cal.{s.id}.sdc_sums"]) for s in sites}


@pytest.mark.parametrize("placement, compensation", [("post_softmax", "vmc"), ("pre_softmax", "sdc_calibrated+vmc")])
def test_torch_calibration_agrees_with_topthetacalibrate_in_onnxruntime(placement, compensation, topt_library):
    model = build_model(SPEC)
    feeds = make_feeds(SPEC)
    lengths = list(range(0, 11, 2))
    table = calibrate(model, _calibration_batches(model, SPEC, feeds), k=2, first_layers=1, first_layers_k=4,
                      placement=placement, compensation=compensation, threshold_lengths=lengths)
    assert model.config._attn_implementation == "sdpa"  # calibration leaves the model as it was
    sums = _onnx_calibration_sums(export(SPEC), feeds, lengths, [4, 2], placement, compensation, topt_library)
    assert sorted(sums) == sorted(table.sites) == [f"layer{i}" for i in range(LAYERS)]
    for site_id, (theta_sums, sdc_sums) in sums.items():
        t = table.sites[site_id]
        assert (t.k, t.placement, t.compensation, t.threshold_lengths) == (4 if site_id == "layer0" else 2, placement,
                                                                            compensation, lengths)
        rows = theta_sums[..., 0] > 0
        assert rows.sum() >= 8, "too few calibrated columns to compare"
        np.testing.assert_allclose(np.asarray(t.thresholds)[rows], thresholds_from_sums(theta_sums)[rows],
                                   rtol=1e-4, atol=1e-6)
        if t.sdc_log_mass is not None:
            np.testing.assert_allclose(np.asarray(t.sdc_log_mass)[rows], sdc_log_mass_from_sums(sdc_sums)[rows],
                                       rtol=1e-4, atol=1e-4)


def test_calibrated_table_is_a_valid_t_json_with_empty_columns_filled(tmp_path):
    model = build_model(SPEC)
    feeds = make_feeds(SPEC)
    table = calibrate(model, _calibration_batches(model, SPEC, feeds), k=2, first_layers_k=2, length_step=3,
                      dataset="tiny")
    table.save(tmp_path / "t.json")
    loaded = ThresholdTable.load(tmp_path / "t.json")
    site = loaded.sites["layer1"]
    assert site.threshold_lengths == [0, 3, 6, 9] and site.calibrated_max_length == 10
    assert all(math.isfinite(x) for row in site.thresholds for x in row)  # columns 0 (n <= k) filled
    assert loaded.calibration["samples"] == 1 and loaded.calibration["sigma"] == 0.1
