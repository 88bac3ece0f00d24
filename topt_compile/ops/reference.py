"""The numpy reference of TopThetaAttention: docs/op.md, literally, in float64.

Readable before fast: the per-row loop mirrors op.md's definitions one for one. Every kernel and
every rewrite is tested against this function.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
from onnx.reference.op_run import OpRun

from .schema import DOMAIN, NUM_STATS, Attributes, Compensation

MASKED_AT_OR_BELOW = -10000.0  # a float mask value <= this hides its key (op.md, Visibility)


def top_theta_attention(
    Q, K, V, attn_mask=None, past_key=None, past_value=None, thresholds=None,
    threshold_lengths=None, past_seqlens=None, past_v_sum=None, sdc_log_mass=None, *,
    scale=None, is_causal=0, k=0, placement="post_softmax", compensation="vmc",
    kv_layout="concat", calibrated_max_length=0, dense_prompt=0, return_decision_margin=False,
):
    """Returns (Y, present_key, present_value, present_v_sum, stats) as op.md defines them.

    With `return_decision_margin`, also the smallest distance between θ and a compared score
    (pre-softmax) or log-probability vs log θ (post-softmax): tests use it to avoid θ values so close
    to a score that float32 and float64 could decide differently.
    """
    attrs = Attributes(scale, int(is_causal), int(k), placement, compensation, kv_layout,
                       int(calibrated_max_length), int(dense_prompt or 0)).validate()
    comp = Compensation.parse(compensation, placement)
    Hq = _shape(Q, "Q", 4)[1]
    if attrs.dense_prompt and _shape(Q, "Q", 4)[2] > 1:  # a prompt or chunk: every row keeps every key
        attrs = replace(attrs, k=np.iinfo(np.int64).max)
    thresholds = np.asarray(thresholds, dtype=np.float32)
    lengths = _lengths(threshold_lengths)
    L = lengths.shape[0]
    _check(thresholds.shape == (Hq, L), f"thresholds: expected [Hq={Hq}, L={L}], got {list(thresholds.shape)}")
    if comp.sdc == "calibrated":
        _check(sdc_log_mass is not None and np.shape(sdc_log_mass) == (Hq, L),
               f"sdc_log_mass: expected [Hq={Hq}, L={L}] with sdc_calibrated")

    margin = np.inf

    def table_theta(b, h, i, col, a, vis, n):
        nonlocal margin
        theta = float(thresholds[h, col])
        if n > attrs.k and np.isfinite(theta):
            margin = min(margin, _decision_margin(a[vis], theta, placement))
        return theta

    outputs = attention_rows(Q, K, V, attn_mask, past_key, past_value, past_seqlens, past_v_sum,
                             sdc_log_mass, lengths, attrs, comp, table_theta)
    return (outputs, margin) if return_decision_margin else outputs


def attention_rows(Q, K, V, attn_mask, past_key, past_value, past_seqlens, past_v_sum, sdc_log_mass,
                   lengths, attrs, comp, row_theta):
    """op.md's math with θ of each row from `row_theta(b, h, i, col, a, vis, n)`, called once per
    row with n >= 1 (a: the row's scores over every key, vis: its visible keys, col: its column).
    Shared by TopThetaAttention (θ from the table) and TopThetaCalibrate (θ = the row's top-k cut).
    Returns (Y, present_key, present_value, present_v_sum, stats)."""
    B, Hq, S, Dh = _shape(Q, "Q", 4)
    _, Hkv, Skv, _ = _shape(K, "K", 4)
    Dv = _shape(V, "V", 4)[3]
    _check(K.shape == (B, Hkv, Skv, Dh), f"K: expected [B={B}, Hkv, Skv, Dh={Dh}], got {list(K.shape)}")
    _check(V.shape[:3] == (B, Hkv, Skv), f"V: expected [B={B}, Hkv={Hkv}, Skv={Skv}, Dv], got {list(V.shape)}")
    _check(Hkv > 0 and Hq % Hkv == 0, f"K: Hq={Hq} is not a multiple of Hkv={Hkv}")
    _check(Q.dtype in (np.float32, np.float16), f"Q: expected float32 or float16, got {Q.dtype}")
    for name, x in (("K", K), ("V", V), ("past_key", past_key), ("past_value", past_value)):
        _check(x is None or x.dtype == Q.dtype, f"{name}: expected {Q.dtype} like Q, got {getattr(x, 'dtype', None)}")
    G = Hq // Hkv
    kv_layout, is_causal, k = attrs.kv_layout, attrs.is_causal, attrs.k
    calibrated_max_length = attrs.calibrated_max_length
    scale = 1.0 / np.sqrt(Dh) if attrs.scale is None else float(attrs.scale)

    # The full key/value sequences, the present outputs, and where each batch's new rows start.
    if kv_layout == "concat":
        _check(past_seqlens is None, "past_seqlens: only with kv_layout=shared_buffer")
        _check((past_key is None) == (past_value is None), "past_value: expected together with past_key")
        P = 0 if past_key is None else past_key.shape[2]
        if past_key is not None:
            _check(past_key.shape == (B, Hkv, P, Dh), f"past_key: expected [{B}, {Hkv}, P, {Dh}], got {list(past_key.shape)}")
            _check(past_value.shape == (B, Hkv, P, Dv), f"past_value: expected [{B}, {Hkv}, {P}, {Dv}], got {list(past_value.shape)}")
        k_all = K if past_key is None else np.concatenate([past_key, K], axis=2)
        v_all = V if past_value is None else np.concatenate([past_value, V], axis=2)
        new_start = np.full(B, P)
        total = P + Skv
    else:
        _check(past_key is not None and past_value is not None, "past_key: required with kv_layout=shared_buffer")
        _check(past_seqlens is not None and np.shape(past_seqlens) == (B,), f"past_seqlens: expected int32 [B={B}] with kv_layout=shared_buffer")
        _check(attn_mask is None, "attn_mask: not allowed with kv_layout=shared_buffer")
        _check(Skv == S, f"K: shared_buffer needs Skv == S, got Skv={Skv}, S={S}")
        M = past_key.shape[2]
        _check(past_key.shape == (B, Hkv, M, Dh), f"past_key: expected [{B}, {Hkv}, M, {Dh}], got {list(past_key.shape)}")
        _check(past_value.shape == (B, Hkv, M, Dv), f"past_value: expected [{B}, {Hkv}, {M}, {Dv}], got {list(past_value.shape)}")
        new_start = np.asarray(past_seqlens, dtype=np.int64)
        _check(bool(np.all((new_start >= 0) & (new_start + S <= M))), f"past_seqlens: expected 0 <= past_seqlens[b] and past_seqlens[b] + S <= M={M}")
        k_all, v_all = past_key.copy(), past_value.copy()
        for b in range(B):
            k_all[b, :, new_start[b]:new_start[b] + S] = K[b]
            v_all[b, :, new_start[b]:new_start[b] + S] = V[b]
        total = M
    if past_v_sum is not None:
        _check(np.shape(past_v_sum) == (B, Hkv, Dv), f"past_v_sum: expected [{B}, {Hkv}, {Dv}], got {list(np.shape(past_v_sum))}")

    visible, bias = _visibility(attn_mask, kv_layout, is_causal, B, Hq, S, total, new_start)
    k64, v64 = k_all.astype(np.float64), v_all.astype(np.float64)
    q64 = Q.astype(np.float64)

    Y = np.zeros((B, Hq, S, Dv), dtype=np.float64)
    stats = np.zeros((B, Hq, NUM_STATS), dtype=np.int64)
    kept_sets = np.zeros((B, Hq, S, total), dtype=bool)
    for b in range(B):
        is_new = (np.arange(total) >= new_start[b]) & (np.arange(total) < new_start[b] + (S if kv_layout == "shared_buffer" else Skv))
        for h in range(Hq):
            g = h // G
            for i in range(S):
                vis = visible[b, h, i]
                n = int(vis.sum())
                if n == 0:
                    continue  # fully masked row: Y = 0, not counted
                a = scale * (k64[b, g] @ q64[b, h, i]) + bias[b, h, i]
                col = threshold_column(lengths, n)
                theta = row_theta(b, h, i, col, a, vis, n)
                keep, p = _keep_and_probabilities(a, vis, n, theta, attrs, comp, sdc_log_mass, h, col)
                kept_sets[b, h, i] = keep
                if p is not None:
                    y = p[keep] @ v64[b, g, keep]
                    if comp.vmc:
                        if past_v_sum is None:
                            v_mean = v64[b, g, vis].sum(axis=0) / n
                        else:
                            v_mean = (past_v_sum[b, g].astype(np.float64) + v64[b, g, vis & is_new].sum(axis=0)) / n
                        y = y + (1.0 - p[keep].sum()) * v_mean
                    Y[b, h, i] = y
                stats[b, h, :5] += (1, n, int(keep.sum()), int(n <= k),
                                    int(calibrated_max_length > 0 and n > calibrated_max_length))
        for g in range(Hkv):
            union_rows = kept_sets[b, g * G:(g + 1) * G].any(axis=0).sum()  # per query row, summed
            stats[b, g * G:(g + 1) * G, 5] = union_rows

    present_v_sum = _present_v_sum(v64, visible, new_start, past_v_sum, kv_layout, S, Skv, G, total)
    return (Y.astype(Q.dtype), k_all.astype(Q.dtype), v_all.astype(Q.dtype),
            present_v_sum.astype(np.float32), stats)


def _decision_margin(a, theta, placement):
    if placement == "pre_softmax":
        return float(np.min(np.abs(a - theta)))
    if theta <= 0:
        return np.inf
    log_p = a - a.max() - np.log(np.exp(a - a.max()).sum())
    return float(np.min(np.abs(log_p - np.log(theta))))


def _keep_and_probabilities(a, vis, n, theta, attrs, comp, sdc_log_mass, h, col):
    """The kept set and p_j of one row (op.md, Kept set and Output); p is None when Y = 0."""
    mx = np.max(a[vis])
    if np.isnan(mx):
        return vis.copy(), np.full_like(a, np.nan)  # a NaN score makes the row NaN
    if mx == -np.inf:
        return np.zeros_like(vis), None  # every visible score is -inf: Y = 0
    e = exp_shifted(a, vis, mx)
    dense = n <= attrs.k
    if attrs.placement == "post_softmax":
        p = e / e.sum()
        keep = vis & ((p > theta) | dense)
        return keep, np.where(keep, p, 0.0)
    keep = vis & ((a > theta) | dense)
    kept_mass = e[keep].sum()
    if comp.sdc == "none" or keep.sum() == n:  # nothing dropped, nothing to compensate
        dropped_mass = 0.0
    elif comp.sdc == "exact":
        dropped_mass = e[vis & ~keep].sum()
    elif comp.sdc == "exp_threshold":
        with np.errstate(over="ignore"):  # θ far above the row max: M = inf, every p_j = 0
            dropped_mass = (n - int(keep.sum())) * np.exp(theta - mx)
    else:  # calibrated
        dropped_mass = np.exp(float(sdc_log_mass[h, col]) - mx)
    denominator = kept_mass + dropped_mass
    if denominator == 0:
        return keep, np.zeros_like(e)  # nothing kept, nothing compensated
    return keep, np.where(keep, e / denominator, 0.0)


def exp_shifted(a, vis, mx):
    """e_j = exp(a_j - mx) on the visible keys, 0 elsewhere (op.md, Scores)."""
    return np.where(vis, np.exp(np.where(vis, a, mx) - mx), 0.0)


def _visibility(attn_mask, kv_layout, is_causal, B, Hq, S, total, new_start):
    """visible [B,Hq,S,T] (op.md, Visibility) and the additive float-mask bias on visible keys."""
    j = np.arange(total)[None, None, None, :]
    i = np.arange(S)[None, None, :, None]
    if kv_layout == "concat":
        visible = np.ones((B, Hq, S, total), dtype=bool)
        if is_causal:  # query i sits at position P + i, as in ONNX Runtime's Attention-23
            visible &= j <= i + new_start[0]
    else:
        start = np.asarray(new_start)[:, None, None, None]
        visible = np.broadcast_to(j < start + S, (B, Hq, S, total)).copy()
        if is_causal:
            visible &= j <= start + i
    bias = np.zeros((B, Hq, S, total), dtype=np.float64)
    if attn_mask is not None:
        _check(2 <= attn_mask.ndim <= 4, f"attn_mask: expected rank 2 to 4, got rank {attn_mask.ndim}")
        try:
            mask = np.broadcast_to(attn_mask, (B, Hq, S, total))
        except ValueError:
            raise ValueError(f"attn_mask: shape {list(attn_mask.shape)} does not broadcast to [{B}, {Hq}, {S}, {total}]") from None
        if mask.dtype == np.bool_:
            visible &= mask
        else:
            m = mask.astype(np.float64)
            visible &= ~(m <= MASKED_AT_OR_BELOW)  # NaN stays visible and poisons the row
            bias = np.where(visible, m, 0.0)
    return visible, bias


def _present_v_sum(v64, visible, new_start, past_v_sum, kv_layout, S, Skv, G, total):
    """Running V sum after this step: base + the new rows the last query row of each group sees."""
    B, Hkv, _, Dv = v64.shape
    out = np.zeros((B, Hkv, Dv))
    n_new = S if kv_layout == "shared_buffer" else Skv
    for b in range(B):
        j = np.arange(total)
        is_new = (j >= new_start[b]) & (j < new_start[b] + n_new)
        for g in range(Hkv):
            seen = visible[b, g * G, S - 1]
            base = past_v_sum[b, g].astype(np.float64) if past_v_sum is not None else v64[b, g, seen & ~is_new].sum(axis=0)
            out[b, g] = base + v64[b, g, seen & is_new].sum(axis=0)
    return out


def _lengths(threshold_lengths):
    """threshold_lengths as int64 [L], checked: L >= 1, strictly increasing, all >= 0."""
    lengths = np.asarray(threshold_lengths, dtype=np.int64)
    _check(lengths.ndim == 1 and lengths.shape[0] >= 1, f"threshold_lengths: expected [L] with L >= 1, got {list(lengths.shape)}")
    _check(bool(np.all(np.diff(lengths) > 0)) and lengths[0] >= 0, "threshold_lengths: expected strictly increasing lengths >= 0")
    return lengths


def threshold_column(lengths, n):
    """The largest c with lengths[c] <= n, or 0 (op.md, Thresholds)."""
    return max(int(np.searchsorted(lengths, n, side="right")) - 1, 0)


def _shape(x, name, rank):
    _check(x is not None and np.ndim(x) == rank, f"{name}: expected rank {rank}, got {None if x is None else np.ndim(x)}")
    return x.shape


def _check(ok, message):
    if not ok:
        raise ValueError(message)


def gqa_front(query, key, value, seqlens_k, cos_cache=None, sin_cache=None, position_ids=None, *,
              num_heads, kv_num_heads, do_rotary=0, rotary_interleaved=0):
    """TopThetaGroupQueryAttention's front (op.md): GQA's inputs → TopThetaAttention's Q [B,Hq,S,D],
    K/V [B,Hkv,S,D] (Q and K rotated, rounded to the input type) and past_seqlens int32 [B]."""
    query = np.asarray(query)
    B, S, W = _shape(query, "query", 3)
    Hq, Hkv = int(num_heads), int(kv_num_heads)
    if key is None:  # packed [B, S, (Hq + 2·Hkv)·D]
        D = W // (Hq + 2 * Hkv)
        x = query.reshape(B, S, Hq + 2 * Hkv, D)
        q, k, v = x[:, :, :Hq], x[:, :, Hq:Hq + Hkv], x[:, :, Hq + Hkv:]
    else:
        D = W // Hq
        q, k, v = query.reshape(B, S, Hq, D), np.asarray(key).reshape(B, S, Hkv, D), np.asarray(value).reshape(B, S, Hkv, D)
    past = np.maximum(np.asarray(seqlens_k, np.int64) + 1 - S, 0)
    if do_rotary:
        pos = np.asarray(position_ids, np.int64) if position_ids is not None else past[:, None] + np.arange(S)[None, :]
        cos = np.asarray(cos_cache, np.float64)[pos][:, :, None, :]  # [B, S, 1, half]
        sin = np.asarray(sin_cache, np.float64)[pos][:, :, None, :]
        q, k = (_rotate(x, cos, sin, bool(rotary_interleaved)) for x in (q, k))
    to_bhsd = lambda x: np.ascontiguousarray(x.transpose(0, 2, 1, 3))  # noqa: E731
    return to_bhsd(q), to_bhsd(k), to_bhsd(v), past.astype(np.int32)


def _rotate(x, cos, sin, interleaved):
    """RoPE on the first 2·half dims of x [B, S, H, D] (com.microsoft RotaryEmbedding's two layouts)."""
    half = cos.shape[-1]
    y = x.astype(np.float64)
    if interleaved:
        x0, x1 = y[..., 0:2 * half:2].copy(), y[..., 1:2 * half:2].copy()
        y[..., 0:2 * half:2], y[..., 1:2 * half:2] = x0 * cos - x1 * sin, x1 * cos + x0 * sin
    else:
        x0, x1 = y[..., :half].copy(), y[..., half:2 * half].copy()
        y[..., :half], y[..., half:2 * half] = x0 * cos - x1 * sin, x1 * cos + x0 * sin
    return y.astype(x.dtype)


def top_theta_group_query_attention(query, key=None, value=None, past_key=None, past_value=None, seqlens_k=None, total_sequence_length=None,
                                    cos_cache=None, sin_cache=None, position_ids=None, thresholds=None,
                                    threshold_lengths=None, past_v_sum=None, sdc_log_mass=None, *, num_heads,
                                    kv_num_heads, do_rotary=0, rotary_interleaved=0, scale=None, k=0,
                                    placement="post_softmax", compensation="vmc", calibrated_max_length=0,
                                    dense_prompt=0):
    """Returns (output [B,S,Hq·D], present_key, present_value, present_v_sum, stats): gqa_front, then
    top_theta_attention with kv_layout=shared_buffer and is_causal=1, Y back to [B, S, Hq·D]."""
    q, k_new, v_new, past = gqa_front(query, key, value, seqlens_k, cos_cache, sin_cache, position_ids,
                                      num_heads=num_heads, kv_num_heads=kv_num_heads, do_rotary=do_rotary,
                                      rotary_interleaved=rotary_interleaved)
    y, *rest = top_theta_attention(q, k_new, v_new, None, past_key, past_value, thresholds, threshold_lengths, past,
                                   past_v_sum, sdc_log_mass, scale=scale or None, is_causal=1, k=k, placement=placement,
                                   compensation=compensation, kv_layout="shared_buffer",
                                   calibrated_max_length=calibrated_max_length, dense_prompt=dense_prompt)
    B, Hq, S, D = y.shape
    return (np.ascontiguousarray(y.transpose(0, 2, 1, 3)).reshape(B, S, Hq * D), *rest)


class TopThetaAttention(OpRun):
    """`onnx.reference` kernel: ReferenceEvaluator(model, new_ops=[TopThetaAttention]).

    onnx.reference matches a custom op by (op_domain, class name), so the class bears the op's name.
    """

    op_domain = DOMAIN

    def _run(self, Q, K, V, attn_mask=None, past_key=None, past_value=None, thresholds=None,
             threshold_lengths=None, past_seqlens=None, past_v_sum=None, sdc_log_mass=None,
             scale=None, is_causal=0, k=0, placement="post_softmax", compensation="vmc",
             kv_layout="concat", calibrated_max_length=0, dense_prompt=0):
        outputs = top_theta_attention(
            Q, K, V, attn_mask, past_key, past_value, thresholds, threshold_lengths, past_seqlens,
            past_v_sum, sdc_log_mass, scale=scale, is_causal=is_causal or 0, k=k or 0,
            placement=_text(placement, "post_softmax"), compensation=_text(compensation, "vmc"),
            kv_layout=_text(kv_layout, "concat"), calibrated_max_length=calibrated_max_length or 0,
            dense_prompt=dense_prompt or 0)
        return outputs[: len(self.onnx_node.output)]


def _text(value, default):
    if value is None:
        return default
    return value.decode() if isinstance(value, bytes) else value


TopThetaAttentionOp = TopThetaAttention  # the name used in prose and by other modules


class TopThetaGroupQueryAttention(OpRun):
    """`onnx.reference` kernel of TopThetaGroupQueryAttention (see TopThetaAttention above)."""

    op_domain = DOMAIN

    def _run(self, *inputs, num_heads=None, kv_num_heads=None, do_rotary=0, rotary_interleaved=0, scale=None, k=0,
             placement="post_softmax", compensation="vmc", calibrated_max_length=0, dense_prompt=0):
        outputs = top_theta_group_query_attention(
            *inputs, num_heads=num_heads, kv_num_heads=kv_num_heads, do_rotary=do_rotary or 0,
            rotary_interleaved=rotary_interleaved or 0, scale=scale, k=k or 0,
            placement=_text(placement, "post_softmax"), compensation=_text(compensation, "vmc"),
            calibrated_max_length=calibrated_max_length or 0, dense_prompt=dense_prompt or 0)
        return outputs[: len(self.onnx_node.output)]
