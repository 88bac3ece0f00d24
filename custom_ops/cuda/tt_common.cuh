// Device helpers shared by the TopThetaAttention CUDA kernels: element conversion, the KV row
// geometry of both layouts, visibility (op.md, Visibility and row length), threshold columns.
#pragma once
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "../include/top_theta_params.h"

namespace topt {
namespace cuda_detail {

constexpr float kMaskedAtOrBelow = -10000.f;  // a float mask entry m <= -10000 masks the key

// Programmatic dependent launch (sm_90): a kernel lets its dependent grid launch before it ends;
// the dependent waits for its completion (and memory) before reading its results. No-ops below
// sm_90 and when the launch did not ask for it.
__device__ __forceinline__ void LaunchDependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
// Brings the 128-byte line at `gmem` into L2 (no register, no wait).
__device__ __forceinline__ void PrefetchL2(const void* gmem) { asm volatile("prefetch.global.L2 [%0];" ::"l"(gmem)); }
__device__ __forceinline__ void WaitPrerequisite() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

template <typename T> __device__ __forceinline__ float ToF(T x);
template <> __device__ __forceinline__ float ToF<float>(float x) { return x; }
template <> __device__ __forceinline__ float ToF<__half>(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ float ToF<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T FromF(float x);
template <> __device__ __forceinline__ float FromF<float>(float x) { return x; }
template <> __device__ __forceinline__ __half FromF<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 FromF<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// 16 bytes of T as floats: E = 16 / sizeof(T) elements.
template <typename T> struct Vec16 { static constexpr int E = 16 / sizeof(T); };
template <typename T>
__device__ __forceinline__ void Unpack16(const uint4& u, float* out) {
  const T* x = reinterpret_cast<const T*>(&u);
#pragma unroll
  for (int e = 0; e < Vec16<T>::E; ++e) out[e] = ToF<T>(x[e]);
}

// 16 bytes global -> shared without registers; pred false zero-fills (gmem must still be a valid address).
__device__ __forceinline__ void CpAsync16(void* smem, const void* gmem, bool pred) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(pred ? 16 : 0));
}
// The same for a shared-memory address, always 16 bytes (the K ring's copies: their offsets are
// per-lane constants, which ptxas folds into the instruction).
__device__ __forceinline__ void CpAsync16(unsigned smem_addr, const void* gmem) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr), "l"(gmem));
}
__device__ __forceinline__ void CpAsyncCommit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void CpAsyncWait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// e^x with results below 2^-126 flushed to zero (ex2.approx.ftz): two instructions where __expf
// spends five on its subnormal fix-up. The decode kernels' sums are relative to a running max
// (terms up to e^8), where a flushed term is far below float precision.
__device__ __forceinline__ float ExpFtz(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x * 1.4426950408889634f));
  return y;
}

// Tensor-core helpers of the prefill kernels (tt_prefill.cu, tt_prefill_sm90.cu).
constexpr float kLog2e = 1.4426950408889634f;
constexpr int kPfKeys = 64;  // keys per prefill tile, and per column-sum tile of V

__device__ __forceinline__ unsigned SmemAddr(const void* p) { return static_cast<unsigned>(__cvta_generic_to_shared(p)); }
__device__ __forceinline__ float Exp2(float x) {  // MUFU.EX2; -inf gives 0
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
__device__ __forceinline__ unsigned Pack(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const unsigned*>(&h);
}
// An m16n8 score fragment (key group nt of a 64-key tile) as m16k16 A fragments: c0,c1 → a0 (a2
// for the odd key group); c2,c3 → a1 (a3). The same layout serves mma.sync and wgmma.
__device__ __forceinline__ void PackA(unsigned (&pa)[4][4], int nt, const float (&w)[4]) {
  pa[nt >> 1][2 * (nt & 1)] = Pack(w[0], w[1]);
  pa[nt >> 1][2 * (nt & 1) + 1] = Pack(w[2], w[3]);
}

// Keys of batch b: rows [0, past_rows) come from the past buffer, [past_rows, valid_end) from the
// new input; query i sits at position past_rows + i and, when causal, sees keys j <= it.
struct KvGeom {
  int64_t past_rows, valid_end, causal_off, past_len;  // past_len: rows per (b, g) in the buffer
};

__device__ __forceinline__ KvGeom GetGeom(const TopThetaParams& p, int64_t b) {
  KvGeom g;
  if (p.kv_layout == KvLayout::kSharedBuffer) {
    g.past_rows = max(p.past_seqlens[b], 0);  // on the device nobody checked it (the GQA front reads seqlens_k)
    g.past_len = p.P;
  } else {
    g.past_rows = p.past_key ? p.P : 0;
    g.past_len = g.past_rows;
  }
  g.valid_end = g.past_rows + p.Skv;
  g.causal_off = g.past_rows;
  return g;
}

// Row j of Kall (d = Dh) or Vall (d = Dv) for (b, kv head g).
template <typename T>
__device__ __forceinline__ const T* KvRow(const void* past, const void* fresh, const TopThetaParams& p,
                                          const KvGeom& geo, int64_t b, int64_t g, int64_t j, int64_t d) {
  const int64_t bg = b * p.Hkv + g;
  return j < geo.past_rows ? static_cast<const T*>(past) + (bg * geo.past_len + j) * d
                           : static_cast<const T*>(fresh) + (bg * p.Skv + (j - geo.past_rows)) * d;
}

// End (exclusive) of the keys row (b, i) may see before the mask: valid and causal.
__device__ __forceinline__ int64_t RowEnd(const TopThetaParams& p, const KvGeom& geo, int64_t i) {
  int64_t end = geo.valid_end;
  if (p.is_causal) end = max(int64_t(0), min(end, geo.causal_off + i + 1));
  return end;
}

// Mask of key j for row (b, h, i): false if masked; `add` gets the float mask value (0 otherwise).
// A NaN float entry is not <= -10000: visible, and its NaN makes the score NaN.
template <typename T>
__device__ __forceinline__ bool MaskVisible(const TopThetaParams& p, int64_t base, int64_t j, float& add) {
  add = 0.f;
  if (p.mask_kind == MaskKind::kBool) return static_cast<const uint8_t*>(p.mask)[base + j * p.mask_stride_t] != 0;
  if (p.mask_kind == MaskKind::kFloat) {
    add = ToF<T>(static_cast<const T*>(p.mask)[base + j * p.mask_stride_t]);
    return !(add <= kMaskedAtOrBelow);
  }
  return true;
}

__device__ __forceinline__ int64_t MaskBase(const TopThetaParams& p, int64_t b, int64_t h, int64_t i) {
  return b * p.mask_stride_b + h * p.mask_stride_h + i * p.mask_stride_s;
}

// The largest column c >= 1 with threshold_lengths[c] <= n, else 0 (op.md, Thresholds). Binary
// search over the increasing lengths: calibrated tables have hundreds of columns, and a linear
// scan by every thread of every CTA was most of a SmolLM2 decode call (measured: 507 columns).
__device__ __forceinline__ int64_t ThetaColumn(const TopThetaParams& p, int64_t n) {
  int64_t lo = 1, hi = p.L;  // invariant: lengths[< lo] <= n (from 1), lengths[>= hi] > n
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (__ldg(p.threshold_lengths + mid) <= n) lo = mid + 1;
    else hi = mid;
  }
  return lo - 1;
}

// The same column found by a whole warp (every lane calls it with the same n): per round each lane
// tests one of up to 32 evenly spaced columns and a ballot narrows the range, so 507 columns cost
// 2 dependent loads instead of the binary search's 9 — the decode kernels' prologue is on the
// critical path of every layer.
__device__ __forceinline__ int64_t ThetaColumnWarp(const TopThetaParams& p, int64_t n) {
  const int lane = threadIdx.x & 31;
  int64_t lo = 1, hi = p.L;  // same invariant as ThetaColumn
  while (lo < hi) {
    const int64_t step = (hi - lo + 31) / 32, c = lo + lane * step;
    const unsigned ok = __ballot_sync(0xffffffffu, c < hi && __ldg(p.threshold_lengths + c) <= n);
    const int m = __popc(ok);  // lengths increase: the lanes that pass are a prefix
    if (m == 0) break;         // lengths[lo] > n
    const int64_t last = lo + (m - 1) * step;
    hi = min(hi, last + step);
    lo = last + 1;
  }
  return lo - 1;
}

// Whether a row's output weights (RowWeights) read its table entries: θ (exp-threshold SDC) or
// the calibrated log-mass. Elsewhere only `dense` (n <= k) matters there, so the merge kernel
// skips the column search: a table per layer, its lines seldom in L2, three dependent loads.
__host__ __device__ __forceinline__ bool WeightsReadTable(const TopThetaParams& p) {
  return p.placement == Placement::kPreSoftmax && (p.sdc == Sdc::kExpThreshold || p.sdc == Sdc::kCalibrated);
}

// Per-row constants once n is known.
struct RowRule {
  float theta, log_mass;  // log_mass: sdc_log_mass[h, c] (calibrated SDC) or 0
  bool dense;
};

__device__ __forceinline__ RowRule RuleAt(const TopThetaParams& p, int64_t h, int64_t n, int64_t c) {
  RowRule r;
  r.theta = p.thresholds[h * p.L + c];
  r.log_mass = (p.sdc == Sdc::kCalibrated && p.sdc_log_mass) ? p.sdc_log_mass[h * p.L + c] : 0.f;
  r.dense = n <= p.k;
  return r;
}

__device__ __forceinline__ RowRule GetRule(const TopThetaParams& p, int64_t h, int64_t n) {
  return RuleAt(p, h, n, ThetaColumn(p, n));
}
// The rule as RowWeights reads it: the table's entries only where WeightsReadTable(p).
__device__ __forceinline__ RowRule WeightsRuleWarp(const TopThetaParams& p, int64_t h, int64_t n) {
  return WeightsReadTable(p) ? RuleAt(p, h, n, ThetaColumnWarp(p, n)) : RowRule{0.f, 0.f, n <= p.k};
}
// GetRule for a whole warp with a warp-uniform n.
__device__ __forceinline__ RowRule GetRuleWarp(const TopThetaParams& p, int64_t h, int64_t n) {
  return RuleAt(p, h, n, ThetaColumnWarp(p, n));
}

// Y of one row from the row's totals (op.md, Output). A NaN row keeps every visible key (as the
// CPU kernel counts it in stats) and writes NaN; a row whose scores are all -inf writes 0. acc = Σ_keep e_j v_j, D = Σ_keep e_j,
// Z = Σ_vis e_j, dropped = Σ_vis∖keep e_j (all relative to mx), vsum = Σ of the rows of v̄.
// Returns the weights: y = wa · acc + wv · vsum.
struct OutWeights {
  float wa, wv;
  bool zero, nan;
};

__device__ __forceinline__ OutWeights RowWeights(const TopThetaParams& p, const RowRule& r, int64_t n,
                                                 int64_t kept, float mx, bool has_nan, float Z, float D,
                                                 float dropped) {
  OutWeights w{0.f, 0.f, false, false};
  if (n == 0) { w.zero = true; return w; }
  if (has_nan) { w.nan = true; return w; }
  if (mx == -INFINITY) { w.zero = true; return w; }
  float denom = Z;
  if (!r.dense && p.placement == Placement::kPreSoftmax) {
    float M = 0.f;  // and 0 when the row keeps every visible key
    if (kept == n) M = 0.f;
    else if (p.sdc == Sdc::kExact) M = dropped;
    else if (p.sdc == Sdc::kExpThreshold) M = float(n - kept) * expf(r.theta - mx);
    else if (p.sdc == Sdc::kCalibrated) M = expf(r.log_mass - mx);
    denom = D + M;
  }
  const float kept_p = denom != 0.f ? D / denom : 0.f;
  w.wa = denom != 0.f ? 1.f / denom : 0.f;
  if (p.vmc && !r.dense) w.wv = (1.f - kept_p) / float(n);
  return w;
}

}  // namespace cuda_detail
}  // namespace topt
