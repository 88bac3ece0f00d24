"""onnxruntime-genai folders: GroupQueryAttention sites, the shared-buffer rewrite, topt-compile on a
folder, onnxruntime_genai generating with the compiled folder, calibration on a folder."""
import json
import shutil

import numpy as np
import onnx
import pytest

from genai_models import DH, HKV, HQ, LAYERS, Decoder, cpu_copy, folder_digest, generate, genai_folder
from topt_compile import cli
from topt_compile.compile import list_sites
from topt_compile.errors import ModelError
from topt_compile.frontends import genai
from topt_compile.ops.reference import top_theta_group_query_attention
from topt_compile.thresholds.calibrate import calibrate
from topt_compile.thresholds.schema import ThresholdTable

THETA = 0.05  # post-softmax: drops keys with p <= 5 % (rows here have 1-12 keys)
PROMPT = [5, 17, 33, 2, 9, 101, 250, 7]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """name → a genai folder: fp32 (the builder's CPU default) and fp16 (built for CUDA, run on CPU)."""
    return {"fp32": genai_folder("fp32", "cpu"),
            "fp16": cpu_copy(genai_folder("fp16", "cuda"), tmp_path_factory.mktemp("fp16") / "dense")}


@pytest.fixture(scope="module")
def compiled(folders, tmp_path_factory):
    """(name, theta) → the compiled folder, compiled once per module."""
    cache = {}

    def get(name, theta):
        if (name, theta) not in cache:
            out = tmp_path_factory.mktemp("compiled") / f"{name}-sparse"
            report = genai.compile_folder(folders[name], out, theta=theta)
            assert len(report.matched) == LAYERS
            cache[name, theta] = out
        return cache[name, theta]

    return get


@pytest.mark.parametrize("name", ["fp32", "fp16"])
def test_every_group_query_attention_node_is_a_matched_site(folders, name):
    sites = list_sites(genai.model_path(folders[name])).sites
    assert [s.id for s in sites] == [f"layer{i}" for i in range(LAYERS)]
    for s in sites:
        assert s.matched and s.form == "GroupQueryAttention", s.reason
        assert (s.Hq, s.Hkv, s.Dh, s.is_causal, s.kv_cache) == (HQ, HKV, DH, 1, True)
        assert s.dtype == {"fp32": "float32", "fp16": "float16"}[name]
        assert s.variant["kv_layout"] == "shared_buffer" and s.variant["do_rotary"] and s.variant["packed_qkv"]


def test_each_group_query_attention_node_becomes_exactly_one_node(folders, compiled):
    """One TopThetaGroupQueryAttention per GQA node, on the same inputs, and nothing else added:
    a decode step runs as many nodes as the dense one (ORT's per-node cost dominates small models)."""
    dense = onnx.load(genai.model_path(folders["fp32"]), load_external_data=False).graph
    sparse = onnx.load(genai.model_path(compiled("fp32", float("-inf"))), load_external_data=False).graph
    assert len(sparse.node) == len(dense.node)
    assert [o.name for o in sparse.output] == [o.name for o in dense.output]
    gqa = [n for n in dense.node if n.op_type == "GroupQueryAttention"]
    topt = [n for n in sparse.node if n.op_type == "TopThetaGroupQueryAttention"]
    assert len(gqa) == len(topt) == LAYERS
    for g, t in zip(gqa, topt):
        assert list(t.input[:10]) == (list(g.input) + [""] * 10)[:10]
        assert {a.name: helper_value(a) for a in t.attribute if a.name in ("num_heads", "kv_num_heads", "do_rotary")} == \
               {a.name: helper_value(a) for a in g.attribute if a.name in ("num_heads", "kv_num_heads", "do_rotary")}


def test_dense_prompt_compiles_into_the_nodes_and_keeps_the_prompt_exact(folders, tmp_path, topt_library):
    """--dense-prompt: the first step (the prompt) gives dense logits, later steps drop keys."""
    out = tmp_path / "dense-prompt"
    genai.compile_folder(folders["fp32"], out, theta=THETA, dense_prompt=True)
    nodes = [n for n in onnx.load(genai.model_path(out), load_external_data=False).graph.node
             if n.op_type == "TopThetaGroupQueryAttention"]
    assert len(nodes) == LAYERS and all(
        {a.name: helper_value(a) for a in n.attribute}.get("dense_prompt") == 1 for n in nodes)
    dense, sparse = Decoder(genai.model_path(folders["fp32"])), Decoder(genai.model_path(out), topt_library)
    ids = np.array([PROMPT, PROMPT[::-1]])
    np.testing.assert_allclose(sparse.step(ids)["logits"], dense.step(ids)["logits"], rtol=1e-5, atol=1e-5)
    steps = [np.abs(sparse.step(t)["logits"] - dense.step(t)["logits"]).max() for t in (ids[:, :1], ids[:, 1:2])]
    assert max(steps) > 1e-4, "the decode steps drop keys at THETA"


def helper_value(attribute):
    return onnx.helper.get_attribute_value(attribute)


@pytest.mark.parametrize("name", ["fp32", "fp16"])
def test_compiled_folder_at_theta_minus_inf_equals_dense_on_prefill_and_decode_steps(folders, compiled, topt_library, name):
    dense = Decoder(genai.model_path(folders[name]))
    sparse = Decoder(genai.model_path(compiled(name, float("-inf"))), topt_library)
    nodes = onnx.load(sparse.model, load_external_data=False).graph.node
    assert sum(n.op_type == "TopThetaGroupQueryAttention" for n in nodes) == LAYERS
    rng = np.random.default_rng(0)
    tol = dict(rtol=1e-5, atol=1e-5) if name == "fp32" else dict(rtol=1e-2, atol=1e-2)
    for ids in [rng.integers(0, 300, (2, 7))] + [rng.integers(0, 300, (2, 1)) for _ in range(4)]:
        want, got = dense.step(ids), sparse.step(ids)
        np.testing.assert_allclose(got["logits"].astype(np.float32), want["logits"].astype(np.float32), **tol)
        for key in dense.past:  # the valid rows of the in-place buffers
            np.testing.assert_allclose(sparse.past[key][:, :, :dense.position].astype(np.float32),
                                       dense.past[key][:, :, :dense.position].astype(np.float32), err_msg=key, **tol)


def test_chunked_prefill_after_a_past_equals_dense_at_batch_1(folders, compiled, topt_library):
    """S > 1 with a past (ORT's GQA allows it at batch 1): queries at past + i, causal among themselves."""
    dense = Decoder(genai.model_path(folders["fp32"]), batch=1)
    sparse = Decoder(genai.model_path(compiled("fp32", float("-inf"))), topt_library, batch=1)
    rng = np.random.default_rng(1)
    for ids in (rng.integers(0, 300, (1, 5)), rng.integers(0, 300, (1, 3)), rng.integers(0, 300, (1, 1))):
        np.testing.assert_allclose(sparse.step(ids)["logits"], dense.step(ids)["logits"], rtol=1e-5, atol=1e-5)


def _with_site_outputs(folder, tmp_path, site_id):
    """The compiled model with the site's op inputs (query, seqlens_k) and output as graph outputs."""
    model = onnx.load(genai.model_path(folder))
    node = next(n for n in model.graph.node if n.name == f"topt.{site_id}/TopThetaGroupQueryAttention")
    names = [node.input[i] for i in (0, 5)] + [node.output[0]]
    model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names)
    path = tmp_path / "with_outputs.onnx"
    onnx.save(model, path)
    shutil.copy(folder / "genai_config.json", tmp_path)  # Decoder reads the cache shape from it
    caches = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer if i.name in node.input[7:9]}
    return path, names, node, caches[node.input[7]], caches[node.input[8]]


@pytest.mark.parametrize("site_id", ["layer0", "layer1"])
def test_site_with_finite_theta_equals_the_numpy_reference_on_prefill_and_decode(compiled, topt_library, tmp_path, site_id):
    path, names, node, cos, sin = _with_site_outputs(compiled("fp32", THETA), tmp_path, site_id)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    attrs = {n: (v.decode() if isinstance(v, bytes) else v) for n, v in attrs.items()}
    layer = int(site_id[len("layer"):])
    decoder = Decoder(path, topt_library)
    thresholds, lengths = np.full((HQ, 1), THETA, np.float32), np.array([0])
    rng = np.random.default_rng(2)
    dropped = 0.0
    for ids in [rng.integers(0, 300, (2, 9))] + [rng.integers(0, 300, (2, 1)) for _ in range(3)]:
        past_key, past_value = (decoder.past[f"past_key_values.{layer}.{kind}"] for kind in ("key", "value"))
        out = decoder.step(ids, names)
        query, seqlens_k, y = (out[n] for n in names)
        assert list(seqlens_k) == [decoder.position - 1] * 2
        common = dict(query=query, past_key=past_key, past_value=past_value, seqlens_k=seqlens_k, cos_cache=cos,
                      sin_cache=sin, threshold_lengths=lengths, **attrs)
        want = top_theta_group_query_attention(thresholds=thresholds, **common)
        np.testing.assert_allclose(y, want[0], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(out[f"present.{layer}.key"], want[1], rtol=1e-5, atol=1e-5)
        dense = top_theta_group_query_attention(thresholds=np.full((HQ, 1), -np.inf, np.float32), **common)[0]
        dropped = max(dropped, float(np.abs(want[0] - dense).max()))
    assert dropped > 1e-3, "THETA drops nothing here: the test would prove nothing"


def test_onnxruntime_genai_generates_the_dense_tokens_from_a_moved_compiled_folder(folders, compiled, tmp_path):
    moved = tmp_path / "elsewhere" / "model"  # the library is named relative to the folder
    shutil.copytree(compiled("fp32", float("-inf")), moved)
    assert generate(moved, PROMPT) == generate(folders["fp32"], PROMPT)
    sparse = generate(compiled("fp32", THETA), PROMPT)
    assert len(sparse) == 10 and all(0 <= t < 300 for t in sparse)


def test_compiling_leaves_the_input_folder_byte_identical_and_writes_a_complete_folder(folders, tmp_path):
    source = folders["fp32"]
    before = folder_digest(source)
    out = tmp_path / "out"
    genai.compile_folder(source, out, theta=THETA)
    genai.compile_folder(source, out, theta=float("-inf"))  # replacing an existing output folder
    assert folder_digest(source) == before
    assert set(folder_digest(out)) == set(before) | {"libtopt_ops.so"}
    config = json.loads((out / "genai_config.json").read_text())
    assert config["model"]["decoder"]["session_options"]["custom_ops_library"] == "libtopt_ops.so"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp dirs left beside it
    model = onnx.load(out / "model.onnx", load_external_data=False)
    assert not any(n.op_type == "GroupQueryAttention" for n in model.graph.node)
    original = onnx.load(source / "model.onnx", load_external_data=False)
    assert [o.name for o in model.graph.output] == [o.name for o in original.graph.output]


def test_cli_compiles_a_folder_or_its_model_file_with_a_t_json(folders, tmp_path, capsys):
    source = folders["fp32"]
    sites = list_sites(genai.model_path(source))
    ThresholdTable.uniform(sites.fingerprint, sites.sites, THETA).save(tmp_path / "t.json")
    for i, model in enumerate((source, source / "model.onnx")):
        assert cli.main([str(model), "--thresholds", str(tmp_path / "t.json"), "-o", str(tmp_path / f"out{i}")]) == 0
        text = capsys.readouterr().out
        assert f"{LAYERS} of {LAYERS} attention sites matched" in text and "GroupQueryAttention [packed QKV" in text
        assert (tmp_path / f"out{i}" / "libtopt_ops.so").is_file()
    assert cli.main([str(source), "--list-sites"]) == 0
    assert "matched  GroupQueryAttention" in capsys.readouterr().out


def test_cli_refuses_an_output_inside_the_input_or_over_a_non_genai_folder(folders, tmp_path, capsys):
    source = shutil.copytree(folders["fp32"], tmp_path / "src")
    assert cli.main([str(source), "--theta", "-inf", "-o", str(source / "sub")]) == 1
    assert cli.main([str(source), "--theta", "-inf", "-o", str(tmp_path)]) == 1
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and "inside the input folder" in errors[0] and "not a genai folder" in errors[1]
    assert not (source / "sub").exists()


def test_a_folder_without_the_shared_kv_buffer_is_refused_naming_the_field(folders, tmp_path):
    source = shutil.copytree(folders["fp32"], tmp_path / "src")
    config = json.loads((source / "genai_config.json").read_text())
    config["search"]["past_present_share_buffer"] = False
    (source / "genai_config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="search.past_present_share_buffer: expected true"):
        genai.compile_folder(source, tmp_path / "out", theta=0.0)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("attribute, value, reason", [
    ("softcap", 30.0, "softcap=30.0 is not supported"),
    ("local_window_size", 4, "local_window_size=4 is not supported"),
    ("smooth_softmax", 1, "smooth_softmax=1 is not supported"),
    ("k_quant_type", "PER_CHANNEL", "attribute k_quant_type=PER_CHANNEL is not understood"),
])
def test_a_gqa_variant_the_op_cannot_express_stays_dense_with_its_reason(folders, tmp_path, topt_library,
                                                                        attribute, value, reason):
    source = shutil.copytree(folders["fp32"], tmp_path / "src")
    model = onnx.load(source / "model.onnx")
    gqa = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"][1]
    for a in list(gqa.attribute):
        if a.name == attribute:
            gqa.attribute.remove(a)
    gqa.attribute.append(onnx.helper.make_attribute(attribute, value))
    (source / "model.onnx.data").unlink()  # onnx appends to an existing data file
    onnx.save(model, source / "model.onnx", save_as_external_data=True, location="model.onnx.data")
    report = genai.compile_folder(source, tmp_path / "out", theta=float("-inf"))
    assert [s.matched for s in report.sites] == [True, False]
    assert reason in report.sites[1].reason and report.sites[1].reason in report.to_text()
    if attribute == "softcap":  # the dense GQA node still runs, in the compiled folder too
        dense, sparse = Decoder(source / "model.onnx"), Decoder(tmp_path / "out" / "model.onnx", topt_library)
        for ids in (np.arange(6)[None].repeat(2, 0), np.full((2, 1), 3)):
            np.testing.assert_allclose(sparse.step(ids)["logits"], dense.step(ids)["logits"], rtol=1e-5, atol=1e-5)


def test_the_fp16_cpu_build_uses_multi_head_attention_which_stays_dense(tmp_path, capsys):
    source = genai_folder("fp16", "cpu")
    sites = list_sites(genai.model_path(source)).sites
    assert len(sites) == LAYERS and not any(s.matched for s in sites)
    assert all("MultiHeadAttention is not rewritten" in s.reason for s in sites)
    assert cli.main([str(source), "--theta", "0", "-o", str(tmp_path / "out")]) == 3
    assert "no attention site matched" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_calibrating_a_folder_counts_every_causal_row_and_its_table_compiles(folders, tmp_path):
    rng = np.random.default_rng(3)
    samples = [rng.integers(0, 300, n) for n in (20, 33)]
    k = 4
    table = calibrate(folders["fp32"], samples, k=k, k_layer={}, length_step=8, progress=False)
    assert sorted(table.sites) == [f"layer{i}" for i in range(LAYERS)]
    # rows with n > k are summed: query i of a prompt sees i + 1 keys
    assert table.calibration["rows_summed"] == LAYERS * HQ * sum(len(s) - k for s in samples)
    table.save(tmp_path / "t.json")
    out = tmp_path / "out"
    report = genai.compile_folder(folders["fp32"], out, thresholds=tmp_path / "t.json")
    assert len(report.matched) == LAYERS
    assert len(generate(out, PROMPT)) == 10
