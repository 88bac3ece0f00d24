"""topt-calibrate: token-id JSONL → t.json → topt-compile; text data; one-line errors."""
import json

import numpy as np

from models import VOCAB, ExportSpec, export
from topt_compile import cli, cli_calibrate
from topt_compile.data import load_samples
from topt_compile.thresholds.schema import ThresholdTable


def test_calibrate_cli_writes_a_table_that_topt_compile_accepts(tmp_path, capsys):
    model = export(ExportSpec("llama", "dynamo", None, "sdpa", True))
    data = tmp_path / "ids.jsonl"
    rng = np.random.default_rng(1)
    data.write_text("".join(json.dumps({"input_ids": rng.integers(0, VOCAB, 70).tolist()}) + "\n" for _ in range(3)))
    t_json = tmp_path / "t.json"
    assert cli_calibrate.main([str(model), "--data", str(data), "--k", "8", "--k-layer", "0=16", "--no-progress",
                               "--no-dense-timing", "-o", str(t_json)]) == 0
    assert "wrote" in capsys.readouterr().out
    table = ThresholdTable.load(t_json)
    assert (table.sites["layer0"].k, table.sites["layer1"].k) == (16, 8)
    assert table.calibration["dataset"] == str(data) and table.calibration["samples"] == 3
    assert cli.main([str(model), "--thresholds", str(t_json), "-o", str(tmp_path / "sparse.onnx")]) == 0


def test_calibrate_cli_reports_a_bad_line_in_one_line(tmp_path, capsys):
    model = export(ExportSpec("llama", "dynamo", None, "sdpa", True))
    data = tmp_path / "bad.jsonl"
    data.write_text('{"input_ids": [1, 2]}\n{"input_ids": "x"}\n')
    assert cli_calibrate.main([str(model), "--data", str(data), "-o", str(tmp_path / "t.json")]) == 4
    err = capsys.readouterr().err.strip()
    assert err.startswith("topt-calibrate: ") and "bad.jsonl:2:" in err and "\n" not in err


class _CharTokenizer:
    path = "chars"

    def encode(self, text):
        return [ord(c) % VOCAB for c in text]


def test_text_file_is_cut_into_windows_of_max_length(tmp_path):
    f = tmp_path / "corpus.txt"
    f.write_text("abcdefghij" * 5)
    s = load_samples(f, _CharTokenizer(), max_length=16)
    assert s.lengths == [16, 16, 16, 2] and s.description["kind"] == "text" and s.description["tokens"] == 50
