"""The numpy reference of TopThetaCalibrate (docs/op.md, last section), literally, in float64.

Exact top-k of a row is TopThetaAttention with a per-row threshold θ_row, the (k+1)-th largest
compared value of the row, so the attention math is reference.py's row loop with θ from
`_ExactTopK`, which also adds each row's θ_row and dropped log-mass to the per-(head, column) sums.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
from onnx.reference.op_run import OpRun

from .reference import _check, _lengths, _shape, _text, attention_rows, exp_shifted
from .schema import DOMAIN, Attributes, Compensation


def top_theta_calibrate(
    Q, K, V, attn_mask=None, past_key=None, past_value=None, threshold_lengths=None, *,
    scale=None, is_causal=0, k=0, placement="post_softmax", compensation="vmc",
    return_decision_margin=False,
):
    """Returns (Y, present_key, present_value, theta_sums, sdc_sums, stats) as op.md defines them.

    With `return_decision_margin`, also the smallest gap between the k-th and (k+1)-th largest
    scores of a calibrated row: tests use it to avoid near-ties that float32 could order otherwise.
    """
    attrs = Attributes(scale, int(is_causal), int(k), placement, compensation).validate()
    comp = Compensation.parse(compensation, placement)
    if comp.sdc == "calibrated":  # the table being calibrated estimates the exact mass: use it
        comp = replace(comp, sdc="exact")
    Hq = _shape(Q, "Q", 4)[1]
    _check(threshold_lengths is not None and np.asarray(threshold_lengths).dtype == np.int64,
           "threshold_lengths: expected int64 [L]")
    lengths = _lengths(threshold_lengths)
    top_k = _ExactTopK(Hq, lengths.shape[0], attrs)
    Y, present_key, present_value, _, stats = attention_rows(
        Q, K, V, attn_mask, past_key, past_value, None, None, None, lengths, attrs, comp, top_k)
    outputs = (Y, present_key, present_value, top_k.theta_sums, top_k.sdc_sums, stats)
    return (outputs, top_k.margin) if return_decision_margin else outputs


class _ExactTopK:
    """θ_row of each row, and the sums: theta_sums[h, c] = (rows, Σ θ_row, Σ θ_row²),
    sdc_sums[h, c] = (rows, log Σ exp(ℓ_row)), ℓ_row = log Σ_{dropped j} exp(a_j)."""

    def __init__(self, Hq, L, attrs):
        self.k, self.placement = attrs.k, attrs.placement
        self.theta_sums = np.zeros((Hq, L, 3), dtype=np.float64)
        self.sdc_sums = np.zeros((Hq, L, 2), dtype=np.float64)
        self.sdc_sums[..., 1] = -np.inf
        self.margin = np.inf

    def __call__(self, b, h, i, col, a, vis, n):
        if n <= self.k:
            return np.inf  # dense row: θ is not used, nothing is summed
        scores = a[vis]
        if not np.all(np.isfinite(scores)):
            return np.inf  # NaN (Y NaN) or infinite inputs: keeps nothing, not summed
        mx = scores.max()
        if self.placement == "pre_softmax":
            compared = scores  # a_j
        else:
            e = exp_shifted(a, vis, mx)
            compared = (e / e.sum())[vis]  # p_j = e_j / Z, as reference.py's keep decision computes it
        ordered = np.sort(compared)[::-1]
        theta = float(ordered[self.k])  # the (k+1)-th largest, duplicates counted
        dropped = scores[~(compared > theta)]
        self.theta_sums[h, col] += (1.0, theta, theta * theta)
        log_mass = mx + np.log(np.exp(dropped - mx).sum())
        self.sdc_sums[h, col] += (1.0, 0.0)
        self.sdc_sums[h, col, 1] = np.logaddexp(self.sdc_sums[h, col, 1], log_mass)
        sorted_scores = np.sort(scores)[::-1]
        if self.k > 0:
            self.margin = min(self.margin, float(sorted_scores[self.k - 1] - sorted_scores[self.k]))
        return theta


def thresholds_from_sums(theta_sums, sigma=0.1):
    """θ = mean + σ·std per (head, column) from theta_sums [Hq, L, 3]; NaN where a column saw no
    row (a calibrator fills those from neighbouring columns)."""
    count, total, squares = np.moveaxis(np.asarray(theta_sums, dtype=np.float64), -1, 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = total / count
        std = np.sqrt(np.maximum(squares / count - mean * mean, 0.0))
    return np.where(count > 0, mean + sigma * std, np.nan)


def sdc_log_mass_from_sums(sdc_sums):
    """log of the mean dropped mass per (head, column): log Σ exp(ℓ_row) − log(rows); −inf where
    a column saw no row."""
    count, log_total = np.moveaxis(np.asarray(sdc_sums, dtype=np.float64), -1, 0)
    with np.errstate(divide="ignore"):
        return np.where(count > 0, log_total - np.log(np.maximum(count, 1.0)), -np.inf)


class TopThetaCalibrate(OpRun):
    """`onnx.reference` kernel: ReferenceEvaluator(model, new_ops=[TopThetaCalibrate])."""

    op_domain = DOMAIN

    def _run(self, Q, K, V, attn_mask=None, past_key=None, past_value=None, threshold_lengths=None,
             scale=None, is_causal=0, k=0, placement="post_softmax", compensation="vmc"):
        outputs = top_theta_calibrate(
            Q, K, V, attn_mask, past_key, past_value, threshold_lengths, scale=scale,
            is_causal=is_causal or 0, k=k or 0, placement=_text(placement, "post_softmax"),
            compensation=_text(compensation, "vmc"))
        return outputs[: len(self.onnx_node.output)]


def fill_columns(values: np.ndarray, has_rows: np.ndarray, empty: float) -> np.ndarray:
    """Columns without rows take the nearest column with rows (the lower one on a tie); a head
    with no row at all takes `empty`."""
    out = np.array(values, dtype=np.float64)
    for h in range(out.shape[0]):
        cols = np.nonzero(has_rows[h])[0]
        for c in np.nonzero(~has_rows[h])[0]:
            out[h, c] = out[h, cols[np.argmin(np.abs(cols - c))]] if cols.size else empty
    return out
