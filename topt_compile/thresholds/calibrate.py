"""Calibration in ONNX Runtime: an exported model + calibration samples → a ThresholdTable (t.json).

Every matched site becomes a `TopThetaCalibrate` node (rewrite/insert_calibrate.py): exact top-k
attention, so deeper layers see the sparsified inputs they will see at inference (TAC), whose
`theta_sums`/`sdc_sums` outputs are the model's only outputs (the LM head and the last layer's
MLP are dead code then). One sample per run, batch 1, no padding, an empty KV cache; per-sample
sums are added in sample order in this process, so the result is the same for any `workers`,
and memory is fixed: [Hq, L, 5] per site, whatever the samples and their lengths.

Per (site, head, column): θ = mean + σ·std of the rows' θ_row (`thresholds_from_sums`), and
`sdc_log_mass` the log mean dropped mass (stored only with `sdc_calibrated`, as t.json requires).

Column grid: `linear` (default) 0, step, 2·step, … up to the longest sample, or `log` (0, then
`step`·2^(j/4), rounded); or explicit `threshold_lengths`. Columns no summed row reached (rows
n ≤ k are dense and never summed) take the value of the nearest column with rows, the lower on a
tie; a head with no summed row gets θ = −inf (its rows are dense anyway). Beyond the range: the
last column covers every longer row (op.md's step function), so rows longer than the longest
calibration sample reuse the last column's θ; `calibrated_max_length` records that length, the op
counts longer rows in `stats[..., 4]`, and the evaluation warns about them.
"""
from __future__ import annotations

import dataclasses
import math
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass, RemoveUnusedOpsetsPass

from ..errors import NoSitesError, ToptError
from ..frontends import onnx as onnx_frontend
from ..match import find_sites, fingerprint
from ..ops.calibrate_reference import fill_columns, sdc_log_mass_from_sums, thresholds_from_sums
from ..frontends import genai
from ..rewrite.insert_calibrate import CalibrateSpec, InsertTopThetaCalibrate, output_name
from ..rewrite.insert_gqa import InsertTopThetaCalibrateGQA, is_gqa
from .schema import SiteThresholds, ThresholdTable

NO_MASS = -1e4  # sdc_log_mass of a head with no calibrated row: exp(NO_MASS − mx) is 0
GRIDS = ("linear", "log")


@dataclasses.dataclass
class CalibrationConfig:
    k: int = 64                             # keys kept per row at calibration; rows n <= k stay dense
    k_layer: dict[int, int] | None = None   # site index → k; None: sites 0 and 1 at 4·k
    placement: str = "post_softmax"
    compensation: str = "vmc"
    sigma: float = 0.1
    grid: str = "linear"                    # linear | log
    length_step: int = 16
    threshold_lengths: list[int] | None = None  # an explicit grid instead
    workers: int = 1                        # processes, each with its own ORT session
    threads: int = 0                        # ORT intra-op threads per process (0: ORT's default)
    dense_timing: bool = True               # also time the dense model on the same samples
    progress: bool = True

    def site_k(self, index: int) -> int:
        k_layer = self.k_layer if self.k_layer is not None else {0: 4 * self.k, 1: 4 * self.k}
        return int(k_layer.get(index, self.k))


def grid_lengths(longest: int, step: int = 16, kind: str = "linear") -> list[int]:
    """The column grid for rows up to `longest` keys (module docstring)."""
    if kind not in GRIDS:
        raise ToptError(f"grid: expected one of {GRIDS}, got {kind!r}")
    if step < 1:
        raise ToptError(f"length_step: expected >= 1, got {step}")
    if kind == "linear":
        return list(range(0, max(longest, 0) + 1, step))
    out, j = [0], 0
    while (n := int(round(step * 2 ** (j / 4)))) <= longest:
        if n > out[-1]:
            out.append(n)
        j += 1
    return out


def calibrate(model_path: str | os.PathLike, samples: Sequence[np.ndarray], config: CalibrationConfig | None = None,
              *, description: dict | None = None, **kwargs) -> ThresholdTable:
    """Thresholds for every matched site of the ONNX model at `model_path` from token-id `samples`.

    `samples`: 1-D int arrays (or a data.Samples, whose description is recorded). `kwargs` are
    CalibrationConfig fields. The report (samples, seconds, calibration/dense time ratio) is in the
    table's `calibration` field.
    """
    config = dataclasses.replace(config or CalibrationConfig(), **kwargs)
    if hasattr(samples, "ids"):
        description = {**samples.description, **(description or {})}
        samples = samples.ids
    samples = [np.asarray(s, np.int64).reshape(-1) for s in samples]
    if not samples or min(len(s) for s in samples) < 1:
        raise ToptError("calibration data: expected at least one non-empty sample")
    longest = max(len(s) for s in samples)
    lengths = config.threshold_lengths or grid_lengths(longest, config.length_step, config.grid)

    t0 = time.perf_counter()
    folder = genai.find_folder(model_path)
    model_path = genai.model_path(folder) if folder else model_path  # an onnxruntime-genai folder: its decoder
    model = onnx_frontend.load(model_path)
    sites = find_sites(model)
    fp = fingerprint(model, sites)
    matched = [s for s in sites if s.matched]
    if not matched:
        raise NoSitesError(f"{model_path}: no attention site matched: nothing to calibrate")
    k = {s.id: config.site_k(i) for i, s in enumerate(sites) if s.matched}
    spec = CalibrateSpec(k, list(lengths), config.placement, config.compensation, sums=True)
    InsertTopThetaCalibrate([s for s in sites if not is_gqa(s)], spec)(model)
    InsertTopThetaCalibrateGQA(sites, spec)(model)
    model.graph.outputs.clear()
    for s in matched:
        for name in ("theta_sums", "sdc_sums"):
            model.graph.outputs.append(_find_output(model, output_name(s.id, name)))
    RemoveUnusedNodesPass()(model)
    RemoveUnusedOpsetsPass()(model)
    kv_dims = {v.name: [None, s.Hkv, None, s.Dh] for s in matched for v in (s.past_key, s.past_value) if v is not None}
    inputs = [(v.name, v.dtype.name, [d if isinstance(d, int) else known for d, known in
                                      zip(v.shape, kv_dims.get(v.name, [None] * len(v.shape)))])
              for v in model.graph.inputs]  # a KV input's symbolic dims (genai's kv_cache_dim) from its site
    prepare_seconds = time.perf_counter() - t0

    with tempfile.TemporaryDirectory(prefix="topt-calibrate.") as tmp:
        calib_path = Path(tmp) / "calibrate.onnx"
        ir.save(model, calib_path, external_data="calibrate.onnx.data")
        del model
        theta, sdc, calib_seconds, dense_seconds = _run_all(
            calib_path, Path(model_path) if config.dense_timing else None, samples, inputs, config)
    theta_sums = {s.id: theta[i] for i, s in enumerate(matched)}
    sdc_sums = {s.id: sdc[i] for i, s in enumerate(matched)}

    tables = {s.id: _site_table(s, theta_sums[s.id], sdc_sums[s.id], lengths, k[s.id], config, longest) for s in matched}
    calibration = {**(description or {"dataset": "token ids (Python API)"}),
                   "samples": len(samples), "sigma": config.sigma, "method": "top-k at calibration (TopThetaCalibrate, onnxruntime)",
                   "k": config.k, "k_layer": {str(i): config.site_k(i) for i in range(len(sites)) if config.site_k(i) != config.k},
                   "placement": config.placement, "compensation": config.compensation,
                   "grid": "explicit" if config.threshold_lengths else f"{config.grid} step {config.length_step}",
                   "rows_summed": int(sum(t[..., 0].sum() for t in theta_sums.values())),
                   "seconds": {"prepare": round(prepare_seconds, 2), "calibrate": round(calib_seconds, 2),
                               "dense_forward": None if dense_seconds is None else round(dense_seconds, 2)},
                   "calibrate_over_dense": None if not dense_seconds else round(calib_seconds / dense_seconds, 3),
                   "workers": config.workers}
    return ThresholdTable(fp, tables, calibration).validate()


def _find_output(model: ir.Model, name: str) -> ir.Value:
    for node in model.graph:
        for v in node.outputs:
            if v.name == name:
                return v
    raise ToptError(f"internal: calibration output {name} not found")


def _site_table(site, theta_sums, sdc_sums, lengths, k, config, longest) -> SiteThresholds:
    has_rows = theta_sums[..., 0] > 0
    thresholds = fill_columns(thresholds_from_sums(theta_sums, config.sigma), has_rows, -math.inf)
    mass = None
    if "sdc_calibrated" in config.compensation:
        mass = fill_columns(sdc_log_mass_from_sums(sdc_sums), has_rows, NO_MASS).tolist()
    return SiteThresholds(site.Hq, site.Hkv, [int(n) for n in lengths], thresholds.tolist(), k=k,
                          placement=config.placement, compensation=config.compensation, sdc_log_mass=mass,
                          calibrated_max_length=int(longest), dtype=site.dtype)


# --- running the samples ---

def feeds_for(ids: np.ndarray, inputs) -> dict[str, np.ndarray]:
    """Batch-1 feeds for one sample: no padding, positions 0…S−1, an empty KV cache."""
    S = len(ids)
    feeds = {}
    for name, dtype, shape in inputs:
        if name == "input_ids":
            feeds[name] = ids[None, :]
        elif name == "attention_mask":
            feeds[name] = np.ones((1, S), np.int64)
        elif name == "position_ids":
            feeds[name] = np.arange(S, dtype=np.int64)[None, :]
        elif len(shape) == 4 and shape[1] is not None and shape[3] is not None:  # past K/V [B, Hkv, P, Dh]
            feeds[name] = np.zeros((1, shape[1], 0, shape[3]), _NUMPY[dtype])
        else:
            raise ToptError(f"graph input {name!r}: cannot feed it for calibration (expected input_ids, "
                            f"attention_mask, position_ids or past K/V [B, Hkv, P, Dh])")
    return feeds


_NUMPY = {"FLOAT": np.float32, "FLOAT16": np.float16, "BFLOAT16": np.float32}
_WORKER: dict[str, Any] = {}


def _session(path: Path, threads: int):
    import onnxruntime as ort
    from .. import get_library_path
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    options.register_custom_ops_library(get_library_path())
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _init_worker(calib_path, dense_path, threads, inputs):
    _WORKER.update(calib=_session(Path(calib_path), threads), inputs=inputs,
                   dense=_session(Path(dense_path), threads) if dense_path else None)


def _run_one(ids):
    """One sample through the calibration model, then (for timing) through the dense model."""
    feeds = feeds_for(ids, _WORKER["inputs"])
    t0 = time.perf_counter()
    out = _WORKER["calib"].run(None, feeds)
    t1 = time.perf_counter()
    if _WORKER["dense"] is not None:
        _WORKER["dense"].run(None, feeds)
    t2 = time.perf_counter()
    # [sites, Hq, L, 3], [sites, Hq, L, 2]; seconds of the calibration run and of the dense run
    return np.stack(out[0::2]), np.stack(out[1::2]), t1 - t0, t2 - t1


def _run_all(calib_path: Path, dense_path: Path | None, samples, inputs, config: CalibrationConfig):
    """Runs every sample; returns the summed sums and the seconds of the calibration and dense runs.

    With `dense_path`, each sample runs through both models back to back, so the two times see
    the same machine load (a shared machine's load changes over minutes)."""
    theta = sdc = None
    workers = max(1, min(config.workers, len(samples)))
    threads = config.threads or (0 if workers == 1 else max(1, (os.cpu_count() or 1) // workers))
    args = (str(calib_path), str(dense_path) if dense_path else None, threads, inputs)
    pool = None
    if workers == 1:
        _init_worker(*args)
        results = map(_run_one, samples)
    else:
        pool = multiprocessing.get_context("spawn").Pool(workers, _init_worker, args)
        results = pool.imap(_run_one, samples)
    calib_seconds = dense_seconds = 0.0
    try:
        desc = "calibrating" + (" (+ dense, for timing)" if dense_path else "")
        for th, sd, tc, td in progress(results, len(samples), desc, config.progress):
            theta, sdc = accumulate(theta, sdc, th, sd)
            calib_seconds += tc
            dense_seconds += td
    finally:
        _WORKER.clear()
        if pool is not None:
            pool.terminate()
    return theta, sdc, calib_seconds, dense_seconds if dense_path else None


def accumulate(theta, sdc, new_theta, new_sdc):
    """Adds one call's theta_sums/sdc_sums to the running totals (None: the first call).

    theta_sums add; sdc_sums add their counts and logaddexp their log-masses (op.md)."""
    if theta is None:
        return np.array(new_theta, np.float64), np.array(new_sdc, np.float64)
    theta = theta + new_theta
    sdc = sdc.copy()
    sdc[..., 0] += new_sdc[..., 0]
    sdc[..., 1] = np.logaddexp(sdc[..., 1], new_sdc[..., 1])
    return theta, sdc


def progress(iterable, total: int, desc: str, enabled: bool = True):
    """tqdm if installed, else a one-line counter on stderr."""
    if not enabled:
        yield from iterable
        return
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is not None:
        yield from tqdm(iterable, total=total, desc=desc, file=sys.stderr, dynamic_ncols=True)
        return
    t0 = time.perf_counter()
    for i, item in enumerate(iterable, 1):
        yield item
        print(f"\r{desc}: {i}/{total} ({time.perf_counter() - t0:.0f} s)", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
