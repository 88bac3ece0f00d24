"""Calibration in PyTorch: a model + calibration batches → a ThresholdTable (t.json).

The method of top-theta.md and of the `TopThetaCalibrate` op (docs/op.md, last section): every
matched site runs exact top-k attention (TAC: deeper layers see the sparsified activations), each
row with n > k adds θ_row — its (k+1)-th largest score (`pre_softmax`) or probability
(`post_softmax`) — to the sums of its (head, length column), and per column
θ = mean + σ·std (σ = 0.1), `calibrate_reference.thresholds_from_sums`, the formula the ONNX
calibration uses. The sites and their ids are the fx front end's (`frontends/fx.py`), so the
table fits `sparsify` and — with `fingerprint` set to the ONNX export's — `topt-compile`.

Sums are kept per exact row length n while the batches run, then merged into the column grid
(sums add, so this equals running TopThetaCalibrate with that grid). Columns no row reached take
the value of the nearest column that has rows (the lower one on a tie); a head with no row longer
than k gets θ = −inf (its rows are dense anyway).
"""
from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any, Iterable

import numpy as np
import torch

from ..frontends import fx as fx_frontend
from ..frontends.torch_op import top_k_calibrate
from ..ops.calibrate_reference import fill_columns, sdc_log_mass_from_sums, thresholds_from_sums
from .schema import SiteThresholds, ThresholdTable

NO_MASS = -1e4  # sdc_log_mass of a head with no calibrated row: exp(NO_MASS − mx) is 0


@dataclasses.dataclass
class CalibrationConfig:
    k: int = 64                          # keys kept per row at calibration (and rows n <= k stay dense)
    first_layers_k: int | None = None    # k of the first `first_layers` sites; None: 4·k
    first_layers: int = 2
    placement: str = "post_softmax"
    compensation: str = "vmc"
    sigma: float = 0.1
    length_step: int = 16                # column grid 0, step, 2·step, … up to the longest row
    threshold_lengths: list[int] | None = None  # or an explicit grid
    fingerprint: str | None = None       # stamp t.json with this (e.g. the ONNX export's, from list_sites)
    dataset: str = ""


class RowSums:
    """A TopThetaSite's calibrator: runs exact top-k, adds θ_row sums per (head, row length n)."""

    def __init__(self, k: int, placement: str, compensation: str):
        self.k, self.placement, self.compensation = k, placement, compensation
        self.theta = torch.zeros(0, 0, 3, dtype=torch.float64)     # [Hq, N, 3]: rows, Σθ, Σθ²
        self.sdc = torch.zeros(0, 0, 2, dtype=torch.float64)       # [Hq, N, 2]: rows, log Σ exp(ℓ)

    def __call__(self, site, query, key, value, attn_mask, past_key, past_value, is_causal, present):
        T = key.shape[2] + (0 if past_key is None else past_key.shape[2])
        y, present_key, present_value, theta, sdc = top_k_calibrate(
            query, key, value, attn_mask, past_key, past_value, threshold_lengths=torch.arange(T + 1),
            scale=site.scale, is_causal=is_causal, k=self.k, placement=self.placement,
            compensation=self.compensation)
        self._add(theta, sdc)
        return (y, present_key, present_value) if present else y

    def _add(self, theta, sdc):
        Hq, N = theta.shape[0], max(theta.shape[1], self.theta.shape[1])
        if self.theta.shape[0] != Hq:  # the first call
            self.theta, self.sdc = self.theta.new_zeros(Hq, 0, 3), self.sdc.new_zeros(Hq, 0, 2)
        grown = torch.zeros(Hq, N, 3, dtype=torch.float64)
        grown[:, :self.theta.shape[1]] += self.theta
        grown[:, :theta.shape[1]] += theta
        mass = torch.full((Hq, N, 2), -math.inf, dtype=torch.float64)
        mass[..., 0] = 0
        mass[:, :self.sdc.shape[1]] = self.sdc
        mass[:, :sdc.shape[1], 0] += sdc[..., 0]
        mass[:, :sdc.shape[1], 1] = torch.logaddexp(mass[:, :sdc.shape[1], 1], sdc[..., 1])
        self.theta, self.sdc = grown, mass

    def table(self, hkv: int, grid: list[int] | None, step: int, sigma: float, dtype: str | None) -> SiteThresholds:
        theta, sdc = self.theta.numpy(), self.sdc.numpy()
        Hq = theta.shape[0]
        lengths = np.nonzero(theta[..., 0].sum(0))[0]
        longest = int(lengths.max()) if lengths.size else 0
        grid = list(grid) if grid is not None else list(range(0, longest + 1, step)) or [0]
        column = np.maximum(np.searchsorted(np.asarray(grid), np.arange(theta.shape[1]), side="right") - 1, 0)
        theta_cols = np.zeros((Hq, len(grid), 3))
        sdc_cols = np.zeros((Hq, len(grid), 2))
        sdc_cols[..., 1] = -np.inf
        for n, c in enumerate(column):  # merge lengths into columns (sums add; log-masses logaddexp)
            theta_cols[:, c] += theta[:, n]
            sdc_cols[:, c, 0] += sdc[:, n, 0]
            sdc_cols[:, c, 1] = np.logaddexp(sdc_cols[:, c, 1], sdc[:, n, 1])
        has_rows = theta_cols[..., 0] > 0
        thresholds = fill_columns(thresholds_from_sums(theta_cols, sigma), has_rows, -math.inf)
        mass = None
        if "sdc_calibrated" in self.compensation:
            mass = fill_columns(sdc_log_mass_from_sums(sdc_cols), has_rows, NO_MASS).tolist()
        return SiteThresholds(Hq, hkv, [int(n) for n in grid], thresholds.tolist(), k=self.k, placement=self.placement,
                              compensation=self.compensation, sdc_log_mass=mass, calibrated_max_length=longest,
                              dtype=dtype)


def calibrate(model: torch.nn.Module, batches: Iterable[Any], config: CalibrationConfig | None = None, *,
              example_inputs: tuple | None = None, **kwargs) -> ThresholdTable:
    """Thresholds for every matched site of `model` from `batches` (each a dict of keyword inputs, a
    tuple of positional inputs, or one tensor). `kwargs` are CalibrationConfig fields.

    The model is left as it was: a Hugging Face model is restored in place, a plain module is
    traced into a copy (`example_inputs` give the head counts, as for `sparsify`)."""
    config = dataclasses.replace(config or CalibrationConfig(), **kwargs)
    first_k = config.first_layers_k if config.first_layers_k is not None else 4 * config.k
    hf = fx_frontend._is_hf(model)
    target = model if hf else copy.deepcopy(model)
    # θ = −inf placeholders: each site's calibrator runs instead of the op
    sparse, report = fx_frontend.sparsify(target, theta=-math.inf, example_inputs=example_inputs)
    sums = {}
    for site_id, site in fx_frontend.site_modules(sparse).items():
        k = first_k if int(site_id.removeprefix("layer")) < config.first_layers else config.k
        sums[site_id] = site.calibrator = RowSums(k, config.placement, config.compensation)
    samples = 0
    try:
        with torch.no_grad():
            for batch in batches:
                if isinstance(batch, dict):
                    sparse(**batch)
                elif isinstance(batch, (tuple, list)):
                    sparse(*batch)
                else:
                    sparse(batch)
                samples += 1
    finally:
        if hf:
            fx_frontend.restore(model)
    by_id = {s.id: s for s in report.sites}
    sites = {sid: s.table(by_id[sid].Hkv, config.threshold_lengths, config.length_step, config.sigma, by_id[sid].dtype)
             for sid, s in sums.items()}
    calibration = {"dataset": config.dataset, "samples": samples, "sigma": config.sigma,
                   "notes": f"topt calibrate_torch: top-k at calibration, k={config.k}, "
                            f"first {config.first_layers} sites k={first_k}"}
    return ThresholdTable(config.fingerprint or report.fingerprint, sites, calibration).validate()
