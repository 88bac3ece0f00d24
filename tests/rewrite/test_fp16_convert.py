"""float16 through ORT's converter: compile → fp16 and fp16 → compile both run and stay close to float32."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto as TP
from onnx import helper as oh
from onnxruntime.transformers.float16 import convert_float_to_float16

from models import ExportSpec, export, make_feeds, run_ort
from topt_compile import fp16
from topt_compile.compile import compile_model, list_sites

THETA = 0.02  # finite: the sparse path, not only the dense rows
SPECS = [ExportSpec("llama", "dynamo", None, "sdpa", True),           # shapes from the exporter
         ExportSpec("llama", "torchscript", None, "eager", True)]     # shapeless: the front end infers them


def _half(feeds):
    return {n: v.astype(np.float16) if v.dtype == np.float32 else v for n, v in feeds.items()}


def _assert_close_to_float32(feeds, want, got):
    valid = feeds["attention_mask"][:, -feeds["input_ids"].shape[1]:].astype(bool)  # padding rows: garbage
    assert got["logits"].dtype == np.float16
    np.testing.assert_allclose(got["logits"][valid].astype(np.float32), want["logits"][valid], rtol=2e-2, atol=5e-3)
    assert (got["logits"][valid].argmax(-1) == want["logits"][valid].argmax(-1)).mean() >= 0.9


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_compile_then_convert_runs_in_float16_close_to_the_float32_compiled_model(spec, tmp_path, topt_library):
    compile_model(export(spec), tmp_path / "sparse.onnx", theta=THETA)
    onnx.save(fp16.convert(tmp_path / "sparse.onnx"), tmp_path / "sparse16.onnx")
    feeds = make_feeds(spec)
    want = run_ort(tmp_path / "sparse.onnx", feeds, topt_library)
    _assert_close_to_float32(feeds, want, run_ort(tmp_path / "sparse16.onnx", _half(feeds), topt_library))
    f32 = {i.name: i for i in onnx.load(tmp_path / "sparse.onnx").graph.initializer}
    f16 = {i.name: i for i in onnx.load(tmp_path / "sparse16.onnx").graph.initializer}
    assert f16["topt.layer0.thresholds"] == f32["topt.layer0.thresholds"]  # float32, bit for bit
    assert sum(i.data_type == TP.FLOAT16 for i in f16.values()) > len(f32) // 2  # the weights are float16


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_convert_then_compile_matches_the_sites_and_stays_close_to_float32(spec, tmp_path, topt_library):
    onnx.save(fp16.convert(export(spec)), tmp_path / "dense16.onnx")
    report = list_sites(tmp_path / "dense16.onnx")
    assert len(report.matched) == 2 and {s.dtype for s in report.matched} == {"float16"}
    compile_model(tmp_path / "dense16.onnx", tmp_path / "sparse16.onnx", theta=THETA)
    compile_model(export(spec), tmp_path / "sparse.onnx", theta=THETA)
    feeds = make_feeds(spec)
    want = run_ort(tmp_path / "sparse.onnx", feeds, topt_library)
    _assert_close_to_float32(feeds, want, run_ort(tmp_path / "sparse16.onnx", _half(feeds), topt_library))


def test_the_plain_converter_breaks_the_thresholds_input_and_the_helper_does_not(tmp_path, topt_library):
    spec = SPECS[0]
    compile_model(export(spec), tmp_path / "sparse.onnx", theta=THETA)
    onnx.save(convert_float_to_float16(onnx.load(tmp_path / "sparse.onnx")), tmp_path / "plain16.onnx")
    with pytest.raises(Exception, match="input 'thresholds': expected float32, got float16"):
        run_ort(tmp_path / "plain16.onnx", _half(make_feeds(spec)), topt_library)


def _one_node(path):
    """TopThetaAttention with a VMC state: past_v_sum in, present_v_sum out, thresholds computed in-graph."""
    B, Hq, Hkv, S, P, D = 1, 4, 2, 3, 5, 8
    shapes = {"Q": [B, Hq, S, D], "K": [B, Hkv, S, D], "V": [B, Hkv, S, D], "past_key": [B, Hkv, P, D],
              "past_value": [B, Hkv, P, D], "past_v_sum": [B, Hkv, D]}
    ins = [oh.make_tensor_value_info(n, TP.FLOAT, shape) for n, shape in shapes.items()]
    outs = [oh.make_tensor_value_info(n, TP.FLOAT, None)
            for n in ("Y", "present_key", "present_value", "present_v_sum")]
    theta = np.array([[3e-8], [0.05], [0.1], [0.2]], np.float32)  # 3e-8: below float16's smallest normal
    inits = [onnx.numpy_helper.from_array(theta, "theta0"),
             onnx.numpy_helper.from_array(np.ones((1, 1), np.float32), "one"),
             onnx.numpy_helper.from_array(np.zeros(1, np.int64), "lengths")]
    nodes = [oh.make_node("Mul", ["theta0", "one"], ["theta"]),
             oh.make_node("TopThetaAttention", ["Q", "K", "V", "", "past_key", "past_value", "theta", "lengths", "",
                                                "past_v_sum"], [o.name for o in outs], domain="ai.topt", is_causal=1)]
    model = oh.make_model(oh.make_graph(nodes, "one", ins, outs, inits),
                          opset_imports=[oh.make_opsetid("", 20), oh.make_opsetid("ai.topt", 1)])
    onnx.save(model, path)
    rng = np.random.default_rng(0)
    feeds = {n: rng.standard_normal(shape).astype(np.float32) for n, shape in shapes.items()}
    feeds["past_v_sum"] = feeds["past_value"].sum(2)
    return feeds


@pytest.mark.parametrize("keep_io_types", [False, True])
def test_vmc_state_stays_float32_and_computed_thresholds_are_cast(tmp_path, topt_library, keep_io_types):
    feeds = _one_node(tmp_path / "one.onnx")
    converted = fp16.convert(tmp_path / "one.onnx", keep_io_types=keep_io_types)
    types = {v.name: v.type.tensor_type.elem_type for v in (*converted.graph.input, *converted.graph.output)}
    assert types["past_v_sum"] == types["present_v_sum"] == TP.FLOAT  # op.md: the VMC state is float32
    assert types["Q"] == (TP.FLOAT if keep_io_types else TP.FLOAT16)
    onnx.save(converted, tmp_path / "one16.onnx")
    want = run_ort(tmp_path / "one.onnx", feeds, topt_library)
    got = run_ort(tmp_path / "one16.onnx", {n: v if n == "past_v_sum" or keep_io_types else v.astype(np.float16)
                                            for n, v in feeds.items()}, topt_library)
    assert got["present_v_sum"].dtype == np.float32
    for name in want:
        np.testing.assert_allclose(got[name].astype(np.float32), want[name], rtol=1e-2, atol=1e-2, err_msg=name)


def test_a_model_proto_argument_is_left_unchanged(tmp_path):
    _one_node(tmp_path / "one.onnx")
    proto = onnx.load(tmp_path / "one.onnx")
    before = proto.SerializeToString()
    fp16.convert(proto)
    assert proto.SerializeToString() == before
