"""TopThetaAttention in PyTorch: the `topt::top_theta_attention` custom op, its ONNX export, and
exact top-k at calibration (TAC).

- `torch.ops.topt.top_theta_attention(Q, K, V, attn_mask, past_key, past_value, thresholds,
  threshold_lengths, sdc_log_mass, scale, is_causal, k, placement, compensation,
  calibrated_max_length) -> (Y, present_key, present_value)`: docs/op.md in the `concat` layout,
  vectorized over [B, Hq, S, Ttot] in float32 (the numpy reference is the per-row float64 version).
- `top_theta_attention(...)`: what the fx and Hugging Face front ends call. In eager mode it runs
  the custom op; under `torch.onnx.export(dynamo=True)` it emits `ai.topt::TopThetaAttention`
  itself through `torch.onnx.ops.symbolic_multi_out`, with `Attributes.onnx_attributes()` — the
  same node, attributes and input order that topt-compile writes into a dense export.
- `top_k_calibrate(...)`: TopThetaCalibrate (op.md, last section) in torch: exact top-k attention
  out, per-(head, column) sums of θ_row and of the dropped mass for the calibrator.

Not here: the `shared_buffer` layout, `past_v_sum`/`present_v_sum` (decode with a running V sum)
and the `stats` output of the op (`attention_stats` computes them for tests and reports).
"""
from __future__ import annotations

import math

import torch

from ..ops import schema
from ..ops.reference import MASKED_AT_OR_BELOW
from ..ops.schema import Attributes, Compensation

Tensor = torch.Tensor


def _prepare(Q, K, V, attn_mask, past_key, past_value, scale, is_causal):
    """Scores a [B,Hq,S,T] (float32, float mask added on visible keys), visible [B,Hq,S,T], K/V all."""
    B, Hq, S, Dh = Q.shape
    Hkv = K.shape[1]
    if Hq % Hkv:
        raise ValueError(f"K: Hq={Hq} is not a multiple of Hkv={Hkv}")
    if (past_key is None) != (past_value is None):
        raise ValueError("past_value: expected together with past_key")
    k_all = K if past_key is None else torch.cat([past_key, K], dim=2)
    v_all = V if past_value is None else torch.cat([past_value, V], dim=2)
    P, T = (0 if past_key is None else past_key.shape[2]), k_all.shape[2]
    scale = 1.0 / math.sqrt(Dh) if scale is None else float(scale)
    q = Q.float().reshape(B, Hkv, Hq // Hkv * S, Dh)            # query heads of a KV group side by side
    a = (torch.matmul(q, k_all.float().transpose(-1, -2)) * scale).reshape(B, Hq, S, T)
    visible = torch.ones((B, Hq, S, T), dtype=torch.bool, device=Q.device)
    if is_causal:  # query i sits at position P + i (op.md, Visibility)
        visible = visible & (torch.arange(T, device=Q.device) <= torch.arange(S, device=Q.device)[:, None] + P)
    if attn_mask is not None:
        if not 2 <= attn_mask.dim() <= 4:
            raise ValueError(f"attn_mask: expected rank 2 to 4, got rank {attn_mask.dim()}")
        mask = attn_mask.expand(B, Hq, S, T)                      # numpy broadcasting from the right
        if mask.dtype == torch.bool:
            visible = visible & mask
        else:
            m = mask.float()
            visible = visible & ~(m <= MASKED_AT_OR_BELOW)       # NaN stays visible and poisons the row
            a = a + torch.where(visible, m, torch.zeros((), device=m.device))
    return a, visible, k_all, v_all


def _attend(a, visible, v_all, theta, k, placement, comp, sdc_row=None):
    """op.md's Kept set and Output for rows with thresholds `theta` [B,Hq,S] (float32).

    Returns Y [B,Hq,S,Dv] float32 and the kept set [B,Hq,S,T]."""
    B, Hq, S, T = a.shape
    Hkv, Dv = v_all.shape[1], v_all.shape[3]
    n = visible.sum(-1)                                            # row lengths [B,Hq,S]
    a_vis = a.masked_fill(~visible, -math.inf)
    mx = a_vis.amax(-1)                                            # NaN if a visible score is NaN
    empty = mx == -math.inf                                        # n = 0, or every visible score -inf
    e = torch.exp(a_vis - torch.where(empty, 0.0, mx)[..., None])  # 0 on hidden keys
    dense = (n <= k)[..., None]
    if placement == "post_softmax":
        p = e / e.sum(-1, keepdim=True)
        keep = visible & ((p > theta[..., None]) | dense)
        pk = p.masked_fill(~keep, 0.0)
    else:
        keep = visible & ((a > theta[..., None]) | dense)
        ek = e.masked_fill(~keep, 0.0)
        if comp.sdc == "exact":
            mass = e.masked_fill(keep, 0.0).sum(-1)
        elif comp.sdc == "exp_threshold":
            mass = (n - keep.sum(-1)) * torch.exp(theta - mx)
        elif comp.sdc == "calibrated":
            mass = torch.exp(sdc_row - mx)
        else:
            mass = torch.zeros_like(mx)
        mass = torch.where(keep.sum(-1) == n, 0.0, mass)             # nothing dropped: nothing to compensate
        denominator = ek.sum(-1) + mass
        pk = torch.where(denominator[..., None] > 0, ek / denominator[..., None], 0.0)
    nan_row = torch.isnan(mx)
    keep = torch.where(nan_row[..., None], visible, keep & ~empty[..., None])
    group = lambda x: x.reshape(B, Hkv, -1, x.shape[-1])           # [B,Hq,S,·] -> [B,Hkv,G·S,·]
    v = v_all.float()
    y = torch.matmul(group(pk), v).reshape(B, Hq, S, Dv)
    if comp.vmc:
        v_mean = torch.matmul(group(visible.float()), v).reshape(B, Hq, S, Dv) / n[..., None]
        y = y + (1.0 - pk.sum(-1, keepdim=True)) * v_mean
    y = torch.where(empty[..., None] & ~nan_row[..., None], 0.0, y)
    return y, keep


def _row_thresholds(table, lengths, n):
    """table[h, c] per row, c = the largest column with lengths[c] <= n, or 0 (op.md, Thresholds)."""
    col = (torch.searchsorted(lengths.to(n.device), n.contiguous(), right=True) - 1).clamp(min=0)
    heads = torch.arange(table.shape[0], device=n.device)[None, :, None]
    return table.float()[heads, col], col


def _check_table(thresholds, threshold_lengths, Hq):
    if threshold_lengths.dim() != 1 or threshold_lengths.shape[0] < 1:
        raise ValueError(f"threshold_lengths: expected [L] with L >= 1, got {list(threshold_lengths.shape)}")
    L = threshold_lengths.shape[0]
    if tuple(thresholds.shape) != (Hq, L):
        raise ValueError(f"thresholds: expected [Hq={Hq}, L={L}], got {list(thresholds.shape)}")


@torch.library.custom_op("topt::top_theta_attention", mutates_args=())
def _top_theta_attention_op(
    Q: Tensor, K: Tensor, V: Tensor, attn_mask: Tensor | None, past_key: Tensor | None,
    past_value: Tensor | None, thresholds: Tensor, threshold_lengths: Tensor, sdc_log_mass: Tensor | None,
    scale: float | None, is_causal: int, k: int, placement: str, compensation: str,
    calibrated_max_length: int,
) -> tuple[Tensor, Tensor, Tensor]:
    Attributes(scale, is_causal, k, placement, compensation).validate()
    comp = Compensation.parse(compensation, placement)
    _check_table(thresholds, threshold_lengths, Q.shape[1])
    a, visible, k_all, v_all = _prepare(Q, K, V, attn_mask, past_key, past_value, scale, is_causal)
    theta, col = _row_thresholds(thresholds, threshold_lengths, visible.sum(-1))
    sdc_row = None
    if comp.sdc == "calibrated":
        if sdc_log_mass is None:
            raise ValueError("sdc_log_mass: required with sdc_calibrated")
        sdc_row = sdc_log_mass.float()[torch.arange(Q.shape[1], device=Q.device)[None, :, None], col]
    y, _ = _attend(a, visible, v_all, theta, k, placement, comp, sdc_row)
    present = (k_all, v_all) if past_key is not None else (K.clone(), V.clone())  # outputs may not alias inputs
    return y.to(Q.dtype), present[0], present[1]


@_top_theta_attention_op.register_fake
def _(Q, K, V, attn_mask, past_key, past_value, thresholds, threshold_lengths, sdc_log_mass, scale,
      is_causal, k, placement, compensation, calibrated_max_length):
    B, Hq, S, _ = Q.shape
    T = K.shape[2] + (0 if past_key is None else past_key.shape[2])
    return (Q.new_empty((B, Hq, S, V.shape[3])), K.new_empty((B, K.shape[1], T, K.shape[3])),
            V.new_empty((B, V.shape[1], T, V.shape[3])))


def top_theta_attention(
    Q: Tensor, K: Tensor, V: Tensor, attn_mask: Tensor | None = None, past_key: Tensor | None = None,
    past_value: Tensor | None = None, *, thresholds: Tensor, threshold_lengths: Tensor,
    sdc_log_mass: Tensor | None = None, scale: float | None = None, is_causal: int = 0, k: int = 0,
    placement: str = "post_softmax", compensation: str = "vmc", calibrated_max_length: int = 0,
    present: bool = False,
):
    """Y [B,Hq,S,Dv], or (Y, present_key, present_value) with `present`: docs/op.md, `concat`.

    Under torch.onnx.export this is one `ai.topt::TopThetaAttention` node with 1 or 3 outputs (as
    topt-compile writes: 3 where the site has a KV cache); elsewhere it runs the custom op.
    """
    attrs = Attributes(scale, int(is_causal), int(k), placement, compensation, "concat",
                       int(calibrated_max_length)).validate()
    if torch.onnx.is_in_onnx_export():
        B, Hq, S, _ = Q.shape
        Hkv, T = K.shape[1], K.shape[2] + (0 if past_key is None else past_key.shape[2])
        inputs = [Q, K, V, attn_mask, past_key, past_value, thresholds, threshold_lengths, None, None, sdc_log_mass]
        while inputs[-1] is None:
            inputs.pop()
        shapes = [(B, Hq, S, V.shape[3]), (B, Hkv, T, K.shape[3]), (B, Hkv, T, V.shape[3])]
        outputs = torch.onnx.ops.symbolic_multi_out(
            f"{schema.DOMAIN}::{schema.OP_TYPE}", inputs, attrs.onnx_attributes(),
            dtypes=[Q.dtype, K.dtype, V.dtype][: 3 if present else 1], shapes=shapes[: 3 if present else 1],
            version=schema.OPSET_VERSION)
        return tuple(outputs) if present else outputs[0]
    y, present_key, present_value = torch.ops.topt.top_theta_attention(
        Q, K, V, attn_mask, past_key, past_value, thresholds, threshold_lengths, sdc_log_mass,
        attrs.scale, attrs.is_causal, attrs.k, attrs.placement, attrs.compensation, attrs.calibrated_max_length)
    return (y, present_key, present_value) if present else y


def top_k_calibrate(
    Q: Tensor, K: Tensor, V: Tensor, attn_mask: Tensor | None = None, past_key: Tensor | None = None,
    past_value: Tensor | None = None, *, threshold_lengths: Tensor, scale: float | None = None,
    is_causal: int = 0, k: int = 0, placement: str = "post_softmax", compensation: str = "vmc",
):
    """TopThetaCalibrate (op.md, last section): (Y, present_key, present_value, theta_sums [Hq,L,3]
    float64, sdc_sums [Hq,L,2] float64). Y is exact top-k attention with the compensation
    (sdc_calibrated computes as sdc_exact); each row with n > k and finite scores adds θ_row, the
    (k+1)-th largest compared value, to its (head, column)."""
    Attributes(scale, int(is_causal), int(k), placement, compensation).validate()
    comp = Compensation.parse(compensation, placement)
    if comp.sdc == "calibrated":
        comp = Compensation(comp.vmc, "exact")
    a, visible, k_all, v_all = _prepare(Q, K, V, attn_mask, past_key, past_value, scale, is_causal)
    B, Hq, S, T = a.shape
    n = visible.sum(-1)
    a_vis = a.masked_fill(~visible, -math.inf)
    mx = a_vis.amax(-1)
    finite = (torch.isfinite(a) | ~visible).all(-1) & (mx > -math.inf)
    if placement == "pre_softmax":
        compared = a_vis
    else:
        e = torch.exp(a_vis - torch.where(finite, mx, 0.0)[..., None])
        compared = (e / e.sum(-1, keepdim=True)).masked_fill(~visible, -math.inf)
    summed = (n > k) & finite
    theta = torch.full_like(mx, math.inf)                            # not summed: keeps nothing
    if k < T:
        theta = torch.where(summed, compared.topk(k + 1, dim=-1).values[..., k], theta)
    y, keep = _attend(a, visible, v_all, theta, k, placement, comp)

    lengths = threshold_lengths.to(torch.int64)
    L = lengths.shape[0]
    col = (torch.searchsorted(lengths, n.contiguous(), right=True) - 1).clamp(min=0)
    index = (torch.arange(Hq)[None, :, None] * L + col)[summed]      # flat (head, column) per summed row
    th = theta[summed].double()
    theta_sums = torch.zeros(Hq * L, 3, dtype=torch.float64)
    theta_sums.index_add_(0, index, torch.stack([torch.ones_like(th), th, th * th], -1))
    dropped = visible & ~keep
    log_mass = (mx + torch.log(torch.exp(a_vis - mx[..., None]).masked_fill(~dropped, 0.0).sum(-1)))[summed].double()
    sdc_sums = torch.zeros(Hq * L, 2, dtype=torch.float64)
    sdc_sums[:, 1] = -math.inf
    sdc_sums.index_add_(0, index, torch.stack([torch.ones_like(log_mass), torch.zeros_like(log_mass)], -1))
    top = torch.full((Hq * L,), -math.inf, dtype=torch.float64).scatter_reduce(0, index, log_mass, "amax")
    total = torch.zeros(Hq * L, dtype=torch.float64).index_add_(0, index, torch.exp(log_mass - top[index]))
    sdc_sums[:, 1] = torch.where(total > 0, top + torch.log(total), -math.inf)
    present = (k_all, v_all) if past_key is not None else (K, V)
    return (y.to(Q.dtype), present[0], present[1], theta_sums.reshape(Hq, L, 3), sdc_sums.reshape(Hq, L, 2))


def attention_stats(Q, K, V, attn_mask=None, past_key=None, past_value=None, *, thresholds, threshold_lengths,
                    scale=None, is_causal=0, k=0, placement="post_softmax", compensation="vmc",
                    calibrated_max_length=0):
    """The op's `stats` output (int64 [B, Hq, 6], op.md) for the same call (sdc_calibrated excluded)."""
    comp = Compensation.parse(compensation, placement)
    a, visible, _, v_all = _prepare(Q, K, V, attn_mask, past_key, past_value, scale, is_causal)
    n = visible.sum(-1)
    theta, _ = _row_thresholds(thresholds, threshold_lengths, n)
    _, keep = _attend(a, visible, v_all, theta, k, placement, comp)
    B, Hq, S, T = a.shape
    Hkv = K.shape[1]
    rows = n > 0
    union = keep.reshape(B, Hkv, Hq // Hkv, S, T).any(2).sum((-1, -2))
    return torch.stack([rows.sum(-1), n.sum(-1), keep.sum((-1, -2)), ((n <= k) & rows).sum(-1),
                        ((n > calibrated_max_length) & rows).sum(-1) * int(calibrated_max_length > 0),
                        union.repeat_interleave(Hq // Hkv, 1)], -1).to(torch.int64)
