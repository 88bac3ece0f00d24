// Decode (S = 1) TopThetaAttention: split-KV (Flash-Decoding) over one CTA per
// (KV split, kv head g, batch b) holding the G query heads of the group, so each K tile is read
// once. Per tile of TK keys: 16-byte K loads → fp32 scores of every head in shared memory →
// keep decisions → ballot OR across the group → compacted kept row ids → gather of only those V
// rows (16-byte loads) into per-head accumulators. A merge kernel combines the splits by
// log-sum-exp and applies SDC/VMC (v̄ from past_v_sum or the running state + the new row).
//   pre_softmax:  one pass (kMode = kPre), online max per head, exact SDC from the running Z.
//   post_softmax: pass 1 (kScores) writes fp32 scores [B, Hq, Tbuf] and per-split (m, Z);
//                 pass 2 (kPost) reads them back a chunk at a time, keeps p_j = e_j / Z > θ,
//                 compacts the kept keys per warp and gathers their V rows.
// Between nodes: the merge lets the next split kernel launch at its start (PDL), whose CTAs prefetch
// their first K tiles into L2 before they wait; the split kernels' K is an L2 streaming window.
#include <algorithm>
#include <cstdlib>
#include <type_traits>

#include "tt_common.cuh"
#include "tt_internal.h"

namespace topt {
namespace cuda_detail {
namespace {

enum Mode : int { kPre = 0, kScores = 1, kPost = 2 };

constexpr int kWarps = 4, kThreads = kWarps * 32;
// The wide instance (pre_softmax, unmasked, 16-bit): one CTA of 8 warps per SM where a (b, g) gets
// many splits (B = 1). Its CTAs are a third as many, so the merge reads a third of the records and
// the CTAs' fixed costs are paid 132 times, not 396; it also has 190 registers to the 4-warp
// instance's 168. Standalone harness, H100, one call: B = 1 32/8/128 8K 0.0155 → 0.0151 ms, 32K
// 0.0341 → 0.0336; 9/3/64 8K 0.0096 → 0.0092, 32K 0.0146 → 0.0129. Every split kernel at 8 warps
// made B = 8 32/8/128 32K slower (0.1942 → 0.2016), hence an instance chosen by the grid
// (bench/results/step_h100_session21).
constexpr int kWideWarps = 8;
constexpr int kWideMinSplits = 32;  // the 4-warp grid's splits per (b, g) from which the wide one runs
constexpr float kRefSlack = 8.f;  // kPre: how far a score may pass the running reference before a rescale
constexpr int kPartF = 8;  // per (split, head) floats: m, Z, D, dropped, kept, union, nan, n
enum PartIdx : int { kM = 0, kZ, kD, kDrop, kKeptF, kUnionF, kNanF, kNF };

template <typename T, int D, int W = kWarps>
struct Cfg {
  static constexpr int E = Vec16<T>::E;          // elements per 16-byte load
  static constexpr int LPR = D / E;               // lanes per row
  static constexpr int RPW = 32 / LPR;            // rows per warp per load
  static constexpr int U = 8;                     // loads in flight per lane (score phase)
  static constexpr int TK = W * RPW * U;          // keys per tile
  static_assert(LPR <= 32 && TK <= W * 32 && TK <= 256, "tile shape (a tile row is one byte in the kept lists)");
};

// Workspace layout (floats): part_acc [B, Hkv, splits, G, D], part_f [B, Hkv, splits, G, kPartF],
// p1 [B, Hkv, splits, G, kPartF] (post pass 1), scores [B, Hq, Tbuf] (post).
// Counters sit in the last CounterBytes of the workspace, zero at launch and again after every call:
// arrivals [B, Hkv] (the fused tail's last CTA of each (b, g) resets its own) and claimed warp
// tiles [B, Hkv], kClaimStride apart (kPre; the merge resets them once the splits are done).
// Every warp claims from its (b, g)'s counter, and counters sharing a line queue in one L2 slice.
constexpr int kClaimStride = 32;  // unsigned: 128 bytes
// VMC without past_v_sum (a compiled model carries no running V sum): v̄'s numerator comes from
// kVSumChunks partial sums per (b, group) [or per (b, h) when the mask differs per head], summed in
// parallel by DecodeVSumKernel before the splits, so no thread walks the whole cache.
constexpr int kVSumChunks = 64;

// The glue's running V sum (params: vsum_state) is read and written by whichever merges the splits
// (the merge kernel, or the split kernel's MergeTail in a TOPT_DECODE_FUSED_MERGE build).
__host__ __device__ inline bool UsesVSumState(const TopThetaParams& p) { return p.vsum_state != nullptr; }
__host__ __device__ inline bool VSumNeeded(const TopThetaParams& p) {
  return (p.vmc || p.present_v_sum) && !p.past_v_sum && !UsesVSumState(p);
}
__host__ __device__ inline bool VSumPerGroup(const TopThetaParams& p) {
  return p.mask_kind == MaskKind::kNone || p.mask_stride_h == 0;
}
__host__ __device__ inline int64_t VSumHeads(const TopThetaParams& p) { return VSumPerGroup(p) ? p.Hkv : p.Hq; }

struct Ws {
  float *acc, *part, *p1, *scores, *vsum, *vsplit;
  unsigned *count, *tiles;
  int64_t tbuf;
  int trace_slot;
  int split_warps;  // warps per split CTA (the stale V sum's parts per split)
};

__host__ __device__ inline int64_t Tbuf(const TopThetaParams& p) {
  return p.kv_layout == KvLayout::kSharedBuffer ? p.P : p.P + p.Skv;
}

__host__ __device__ inline int64_t CounterBytes(const TopThetaParams& p) {
  return (p.B * p.Hkv * 4 + 127) / 128 * 128 + p.B * p.Hkv * kClaimStride * 4 + 128;  // + 128: alignment slack
}

__host__ __device__ inline Ws CarveWs(void* base, int64_t total_bytes, const TopThetaParams& p, int splits) {
  Ws w;
  w.count = reinterpret_cast<unsigned*>(static_cast<char*>(base) + (total_bytes - CounterBytes(p)) / 16 * 16);
  const uintptr_t after = reinterpret_cast<uintptr_t>(w.count + p.B * p.Hkv);
  w.tiles = reinterpret_cast<unsigned*>((after + 127) / 128 * 128);
  const int64_t G = p.Hq / p.Hkv, units = p.B * p.Hkv * splits * G;
  w.acc = static_cast<float*>(base);
  w.part = w.acc + units * p.Dv;
  w.p1 = w.part + units * kPartF;
  w.scores = w.p1 + units * kPartF;
  w.vsum = w.scores + (p.placement == Placement::kPostSoftmax ? p.B * p.Hq * Tbuf(p) : 0);
  w.vsplit = w.vsum + (VSumNeeded(p) ? p.B * VSumHeads(p) * kVSumChunks * p.Dv : 0);
  w.tbuf = Tbuf(p);
  w.trace_slot = 0;
  w.split_warps = kWarps;
  return w;
}

__host__ __device__ inline int64_t WsFloats(const TopThetaParams& p, int splits) {
  const int64_t G = p.Hq / p.Hkv, units = p.B * p.Hkv * splits * G;
  const int64_t scores = p.placement == Placement::kPostSoftmax ? p.B * p.Hq * Tbuf(p) : 0;
  const int64_t vsum = VSumNeeded(p) ? p.B * VSumHeads(p) * kVSumChunks * p.Dv : 0;
  const int64_t vsplit = UsesVSumState(p) ? p.B * p.Hkv * splits * kWideWarps * p.Dv : 0;  // stale-state fallback
  return units * (p.Dv + 2 * kPartF) + scores + vsum + vsplit;
}

// Split s of `splits` over keys [0, n_keys), in whole tiles.
__device__ __forceinline__ void SplitRange(int64_t n_keys, int s, int splits, int tk, int64_t& lo, int64_t& hi) {
  int64_t chunk = (n_keys + splits - 1) / splits;
  chunk = (chunk + tk - 1) / tk * tk;
  lo = min(n_keys, int64_t(s) * chunk);
  hi = min(n_keys, lo + chunk);
}

__device__ __forceinline__ float WarpMax(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ float WarpSum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// n of row (b, h, 0): every valid key without a mask, else the count of visible ones.
template <typename T, int W = kWarps>
__device__ int64_t CountVisible(const TopThetaParams& p, int64_t end, int64_t b, int64_t h, float* red) {
  if (p.mask_kind == MaskKind::kNone) return end;
  const int64_t base = MaskBase(p, b, h, 0);
  float c = 0.f;
  for (int64_t j = threadIdx.x; j < end; j += W * 32) {
    float add;
    c += MaskVisible<T>(p, base, j, add) ? 1.f : 0.f;
  }
  c = WarpSum(c);
  __syncthreads();
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = c;
  __syncthreads();
  float t = 0.f;
  for (int w = 0; w < W; ++w) t += red[w];
  return int64_t(t);
}

// *ctr += 1, returning the old value, not awaited until that value is used. ptxas turns a one-lane
// atomicAdd (also inline `atom.add`, and `atom.inc` with an all-ones limit) into a warp-aggregated
// atomic that shuffles its result right away: every claim then waited its L2 round trip (ncu: 20-26%
// of the split kernel's stall samples). `atom.inc` with limit 2^31 - 1 is left alone.
__device__ __forceinline__ unsigned AtomicAddNoWait(unsigned* ctr) {
  unsigned old;
  asm volatile("atom.global.inc.u32 %0, [%1], 2147483647;\n" : "=r"(old) : "l"(ctr));
  return old;
}


// -DTOPT_DECODE_TRACE=1 (experiment, bench/decode_trace.py): thread 0 of each split and merge CTA
// stamps %globaltimer at its entry, after its loop / wait and at its end, with its SM, into
// g_trace[slot] (slot: the launch's parity, so a chain's last two calls both show).
#ifndef TOPT_DECODE_TRACE
#define TOPT_DECODE_TRACE 0
#endif
constexpr int kTraceCtas = 4096;
#if TOPT_DECODE_TRACE
__device__ unsigned long long g_trace[2][2][kTraceCtas][8];  // [slot][split, merge][cta][stamps..., sm]
// by thread 0 of the CTA, or (per_warp) by lane 0 of each warp
__device__ __forceinline__ void Stamp(int slot, int kernel, int64_t cta, int k, bool per_warp = false) {
  if ((per_warp ? (threadIdx.x & 31) : threadIdx.x) != 0 || cta >= kTraceCtas) return;
  unsigned long long t;
  unsigned sm;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
  g_trace[slot][kernel][cta][k] = t;
  g_trace[slot][kernel][cta][7] = sm;
}
#else
__device__ __forceinline__ void Stamp(int, int, int64_t, int, bool = false) {}
#endif

// Tensor-core scores (16-bit T): the tile's keys are the M rows of m16n8k16, the G heads
// (padded to 8) the N columns, so a 16-key × 16-dim block of K is one ldmatrix.x4 and one mma.
#ifndef TOPT_DECODE_MMA
#define TOPT_DECODE_MMA 1
#endif
__device__ __forceinline__ void LdMatrixX4(unsigned (&a)[4], unsigned addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(a[0]), "=r"(a[1]), "=r"(a[2]), "=r"(a[3]) : "r"(addr));
}
template <typename T>
__device__ __forceinline__ void Mma16816(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
  if constexpr (std::is_same<T, __half>::value) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// K tiles per warp in the ring: the one being scored and the next one in flight. With 3, the
// 132 SMs kept ~13 MB of K requested ahead, and each kept V row (a load that waits for its tile's
// scores) queued behind it: the standalone harness, same call, 2 vs 3 stages: B = 1 32/8/128 8K
// 0.0158 vs 0.0175 ms, 32K 0.0355 vs 0.0380; 9/3/64 32K 0.0147 vs 0.0159; B = 8 32/8/128 32K
// 0.1960 vs 0.1972 (bench/results/step_h100_session19). 4 were slower still (cuda_kernel.md).
#ifndef TOPT_DECODE_STAGES
#define TOPT_DECODE_STAGES 2
#endif
#ifndef TOPT_DECODE_MIN_BLOCKS
#define TOPT_DECODE_MIN_BLOCKS 3
#endif
#ifndef TOPT_DECODE_CLAIM
#define TOPT_DECODE_CLAIM 1  // kPre, 16-bit: an instance that claims warp tiles (0: all dealt statically)
#endif
#ifndef TOPT_DECODE_CLAIM_AHEAD
#define TOPT_DECODE_CLAIM_AHEAD 4  // kPre: tiles between a claim and its use
#endif
constexpr int kStages = TOPT_DECODE_STAGES;  // stages of the K ring (cp.async)

// Claimed warp tiles pay where a (b, g) has a few splits (2-8: its warps' claims on one counter do
// not queue; at B = 1, 50 splits of 32/8 heads, 32K ran 10% slower with claims), each warp with
// several tiles to claim beyond the static deal (else each waits for the claim that says its row is
// done: B = 1, 9/3 heads, 8K, 0.0155 → 0.0179 ms). One split per (b, g) has no other CTA to balance
// against, and the instance with the claim code runs 5% slower there (B = 32, 32/8 heads, Dh 128,
// 32K), hence two instances.
__host__ __device__ inline bool ClaimsPay(int64_t warp_tiles, int splits) {
  return splits > 1 && splits <= 8 && warp_tiles - int64_t(kStages) * splits * kWarps >= 4 * int64_t(splits) * kWarps;
}
constexpr int kMinBlocks = TOPT_DECODE_MIN_BLOCKS;  // resident CTAs per SM the registers allow (G <= 4)

template <typename T, int D, int W = kWarps>
constexpr int KStageBytes() { return Cfg<T, D, W>::TK * D * int(sizeof(T)); }

// v̄'s numerator (VMC, present_v_sum): the sum of row (b, h, 0)'s visible V rows at column d, from
// past_v_sum or the running state (`state_past`: its sum of rows [0, past)) plus the visible new
// rows, else from DecodeVSumKernel's partial sums.
template <typename T>
__device__ float VSumAt(const TopThetaParams& p, const Ws& ws, const KvGeom& geo, int64_t b, int64_t g, int64_t h,
                        int64_t d, float state_past) {
  const int64_t Dv = p.Dv;
  if (p.past_v_sum || UsesVSumState(p)) {
    float vs = p.past_v_sum ? p.past_v_sum[(b * p.Hkv + g) * Dv + d] : state_past;
    const int64_t mbase = MaskBase(p, b, h, 0);
    for (int64_t j = geo.past_rows; j < RowEnd(p, geo, 0); ++j) {
      float add;
      if (MaskVisible<T>(p, mbase, j, add)) vs += ToF<T>(KvRow<T>(p.past_value, p.v_new, p, geo, b, g, j, Dv)[d]);
    }
    return vs;
  }
  const float* parts = ws.vsum + ((b * VSumHeads(p) + (VSumPerGroup(p) ? g : h)) * kVSumChunks) * Dv + d;
  float vs = 0.f;
  for (int c = 0; c < kVSumChunks; ++c) vs += parts[c * Dv];
  return vs;
}

// The running state's slot for `past` rows holds their sum (no past rows: trivially).
__device__ __forceinline__ bool VSumStateFresh(const TopThetaParams& p, const KvGeom& geo, int64_t b) {
  const int64_t past = geo.past_rows;
  return past == 0 || p.vsum_state_len[(past & 1) * p.B + b] == past;
}
__device__ __forceinline__ float VSumStateAt(const TopThetaParams& p, const KvGeom& geo, int64_t b, int64_t g, int64_t d) {
  const int64_t past = geo.past_rows;
  return past == 0 ? 0.f : p.vsum_state[(((past & 1) * p.B + b) * p.Hkv + g) * p.Dv + d];
}

// The group's v̄ numerator at column d into present_v_sum and the state's slot for the next length.
__device__ __forceinline__ void StoreVSum(const TopThetaParams& p, const KvGeom& geo, int64_t b, int64_t g, int64_t d, float vs) {
  if (p.present_v_sum) p.present_v_sum[(b * p.Hkv + g) * p.Dv + d] = vs;
  if (UsesVSumState(p)) p.vsum_state[((((geo.past_rows + p.Skv) & 1) * p.B + b) * p.Hkv + g) * p.Dv + d] = vs;
}
__device__ __forceinline__ void StoreVSumStateLen(const TopThetaParams& p, const KvGeom& geo, int64_t b) {
  p.vsum_state_len[((geo.past_rows + p.Skv) & 1) * p.B + b] = int32_t(geo.past_rows + p.Skv);
}

// The last-arriving CTA of (b, g) merges the splits' partials by log-sum-exp and writes Y, stats,
// present_v_sum and the group's new K/V rows (the former merge kernel, folded in: one launch).
// fsm: shared scratch of GM · splits floats (the K ring, done by now).
template <typename T, int D, int GM>
__device__ __forceinline__ void MergeTail(const TopThetaParams& p, const Ws& ws, int splits, int64_t b, int64_t g,
                                          int G, float* fsm, const float* head_n) {
  __shared__ int s_last;
  __shared__ float mst[GM][3];  // kept, union, dense
  __shared__ OutWeights sow[GM];
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  __threadfence();  // this CTA's partials are visible device-wide before its arrival counts
  __syncthreads();
  unsigned* ctr = ws.count + (b * p.Hkv + g);
  if (tid == 0) s_last = atomicAdd(ctr, 1u) == unsigned(splits - 1);
  __syncthreads();
  if (!s_last) return;
  __threadfence();
  if (tid == 0) *ctr = 0u, ws.tiles[(b * p.Hkv + g) * kClaimStride] = 0u;  // every CTA of (b, g) has arrived: ready for the next call / graph replay
  const int64_t bu = (b * p.Hkv + g) * int64_t(splits) * G;  // unit of (split s, head r): bu + s·G + r
  for (int r = warp; r < G; r += kWarps) {
    float m = -INFINITY;
    for (int t = lane; t < splits; t += 32) m = fmaxf(m, __ldcg(ws.part + (bu + int64_t(t) * G + r) * kPartF + kM));
    m = WarpMax(m);
    float t6[6] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f};  // Z, D, dropped, kept, union, nan
    for (int t = lane; t < splits; t += 32) {
      const float* pf = ws.part + (bu + int64_t(t) * G + r) * kPartF;
      const float mm = __ldcg(pf + kM);
      const float f = mm == -INFINITY ? 0.f : expf(mm - m);
      fsm[r * splits + t] = f;
      t6[0] += f * __ldcg(pf + kZ);
      t6[1] += f * __ldcg(pf + kD);
      t6[2] += f * __ldcg(pf + kDrop);
      t6[3] += __ldcg(pf + kKeptF);
      t6[4] += __ldcg(pf + kUnionF);
      t6[5] = fmaxf(t6[5], __ldcg(pf + kNanF));
    }
#pragma unroll
    for (int k = 0; k < 6; ++k) t6[k] = k == 5 ? WarpMax(t6[k]) : WarpSum(t6[k]);
    if (lane == 0) {
      const int64_t h = g * G + r, n = int64_t(head_n[r]);
      const int64_t kept = t6[5] > 0.f ? n : int64_t(t6[3]);  // a NaN row keeps every visible key
      const RowRule rule = GetRule(p, h, n);
      sow[r] = RowWeights(p, rule, n, kept, m, t6[5] > 0.f, t6[0], t6[1], t6[2]);
      mst[r][0] = float(kept);
      mst[r][1] = t6[4];
      mst[r][2] = rule.dense ? 1.f : 0.f;
    }
  }
  __syncthreads();

  const KvGeom geo = GetGeom(p, b);
  const int64_t end = RowEnd(p, geo, 0);
  // acc = Σ_s f_s · acc_s per (head, 4-column chunk): the splits are sliced over the threads
  // (SL slices per item) and 16 loads kept in flight per thread, so the tail is a few L2 round trips.
  __shared__ float4 red4[kThreads];
  constexpr int NQ = D / 4;
  const int items = G * NQ, SL = items >= kThreads ? 1 : kThreads / items;
  for (int x0 = 0; x0 < items; x0 += kThreads) {
    const int item = x0 + tid % items, sl = tid / items;  // items >= kThreads: tid % items = tid
    float4 a = make_float4(0.f, 0.f, 0.f, 0.f);
    if (item < items && sl < SL) {
      const int r = item / NQ, c = item % NQ;
      const float* fr = fsm + r * splits;
      const float* ab = ws.acc + (bu + r) * D + 4 * c;
#pragma unroll 16
      for (int t = sl; t < splits; t += SL) {
        const float f = fr[t];
        const float4 v = __ldcg(reinterpret_cast<const float4*>(ab + int64_t(t) * G * D));
        a.x += f * v.x; a.y += f * v.y; a.z += f * v.z; a.w += f * v.w;
      }
    }
    if (SL > 1) {
      __syncthreads();
      red4[tid] = a;
      __syncthreads();
      if (tid < items)
        for (int k = 1; k < SL; ++k) {
          const float4 o = red4[tid + k * items];
          a.x += o.x; a.y += o.y; a.z += o.z; a.w += o.w;
        }
    }
    if (item >= items || sl != 0) continue;
    const int r = item / NQ, c = item % NQ;
    const OutWeights ow = sow[r];
    const int64_t h = g * G + r;
    const bool state = UsesVSumState(p);
    const bool need_vs = ow.wv != 0.f || (r == 0 && (p.present_v_sum || state));
    float vs[4] = {0.f, 0.f, 0.f, 0.f};
    if (need_vs) {
      const bool fresh = !state || VSumStateFresh(p, geo, b);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t d = 4 * c + e;
        float past_sum = 0.f;
        if (state && fresh) past_sum = VSumStateAt(p, geo, b, g, d);
        else if (state)  // stale (first step after a prompt): the splits' sums of V's past rows
          for (int64_t x = 0; x < int64_t(splits) * kWarps; ++x) past_sum += __ldcg(ws.vsplit + ((b * p.Hkv + g) * splits * kWarps + x) * D + d);
        vs[e] = VSumAt<T>(p, ws, geo, b, g, h, d, past_sum);
        if (r == 0) StoreVSum(p, geo, b, g, d, vs[e]);
      }
    }
    const float av[4] = {a.x, a.y, a.z, a.w};
    T* y = static_cast<T*>(p.y) + (b * p.Hq + h) * D + 4 * c;
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float v = ow.nan ? NAN : ow.zero ? 0.f : ow.wa * av[e] + (ow.wv != 0.f ? ow.wv * vs[e] : 0.f);
      y[e] = FromF<T>(v);
    }
  }
  if (UsesVSumState(p) && g == 0 && tid == 0) StoreVSumStateLen(p, geo, b);
  {  // the group's new K/V rows into present (at past_rows; in place or after the copy)
    const int64_t rows = p.kv_layout == KvLayout::kSharedBuffer ? p.P : p.P + p.Skv;
    const int64_t bg = b * p.Hkv + g;
    constexpr int64_t W = D * int64_t(sizeof(T)) / 4;  // 32-bit words per row
    for (int64_t x = tid; x < p.Skv * W; x += kThreads) {
      const int64_t sr = x / W, w = x % W;
      const int64_t dst = (bg * rows + geo.past_rows + sr) * W + w, src = (bg * p.Skv + sr) * W + w;
      if (p.present_key) static_cast<uint32_t*>(p.present_key)[dst] = static_cast<const uint32_t*>(p.k_new)[src];
      if (p.present_value) static_cast<uint32_t*>(p.present_value)[dst] = static_cast<const uint32_t*>(p.v_new)[src];
    }
  }
  if (p.stats && tid < G * kNumStats) {
    const int r = tid / kNumStats, k = tid % kNumStats;
    const int64_t n = int64_t(head_n[r]);
    int64_t v = 0;
    if (k == kGroupVRows) v = int64_t(mst[r][1]);  // every head of the group
    if (n > 0) {
      switch (k) {
        case kRows: v = 1; break;
        case kVisible: v = n; break;
        case kKept: v = int64_t(mst[r][0]); break;
        case kDenseRows: v = mst[r][2] != 0.f; break;
        case kBeyond: v = p.calibrated_max_length > 0 && n > p.calibrated_max_length; break;
      }
    }
    p.stats[(b * p.Hq + g * G + r) * kNumStats + k] = v;
  }
}

// θ of heads h0.. h0 + G - 1 of a row of n keys without a mask, in one round of loads, where the
// table has at most 4·kThreads columns: thread t loads the lengths and its heads' entries at
// columns 4t..4t+3; the column is the count of lengths[1..L) <= n (ThetaColumn's), and its entries
// come back through shared memory. ThetaColumnWarp's search is two dependent rounds and the entries
// a third, on every CTA's path to its first tile, of a table seldom in L2 (one per layer; ncu of the
// real step: 9.5% of the split kernel's stall samples sat on the search). All threads call it.
template <int GM, int W = kWarps>
__device__ void ThetasOneRound(const TopThetaParams& p, int64_t h0, int G, int64_t n, float (&theta)[GM]) {
  __shared__ int counts[W];
  __shared__ float found[GM];
  const int tid = threadIdx.x;
  int count = 0;
  float th0[GM], th1[GM], th2[GM], th3[GM];  // columns 4t..4t+3; four arrays, not one [GM][4], which the
                                            // compiler put in local memory to index by column % 4
  auto load = [&](int e, float (&th)[GM]) {
    const int64_t c = 4 * tid + e;
    count += (c >= 1 && c < p.L && __ldg(p.threshold_lengths + c) <= n) ? 1 : 0;
#pragma unroll
    for (int r = 0; r < GM; ++r) th[r] = (c < p.L && r < G) ? __ldg(p.thresholds + (h0 + r) * p.L + c) : 0.f;
  };
  load(0, th0);
  load(1, th1);
  load(2, th2);
  load(3, th3);
  count = __reduce_add_sync(0xffffffffu, count);
  if ((tid & 31) == 0) counts[tid >> 5] = count;
  __syncthreads();
  int column = 0;
#pragma unroll
  for (int w = 0; w < W; ++w) column += counts[w];
  if (tid == column / 4) {
    const int e = column % 4;
#pragma unroll
    for (int r = 0; r < G && r < GM; ++r) found[r] = e == 0 ? th0[r] : e == 1 ? th1[r] : e == 2 ? th2[r] : th3[r];
  }
  __syncthreads();
#pragma unroll
  for (int r = 0; r < GM; ++r) theta[r] = found[r < G ? r : 0];
}

// grid (splits, Hkv, B), block kThreads, dynamic smem kStages · KStageBytes (kPre, kScores).
// Warp w owns rows [w·RW, w·RW + RW) of every tile end to end — scores, decisions, compaction,
// V gather — with its own running max, so the only CTA barrier per tile is the K ring's.
// kFuse (kPre): the last CTA of each (b, g) merges the splits (MergeTail) instead of the merge kernel.
// W: warps per CTA (kWideWarps: the wide instance, one CTA per SM).
template <typename T, int D, int GM, int kMode, bool kFuse = false, bool kClaimed = false, bool kMasked = true, int W = kWarps>
__global__ void __launch_bounds__(W * 32, W > kWarps ? 1 : GM <= 4 ? kMinBlocks : 2) DecodeSplitKernel(TopThetaParams p, Ws ws) {
  constexpr int kWarps = W, kThreads = W * 32;  // this instance's (hide the namespace's)
  static_assert(!kFuse || W == ::topt::cuda_detail::kWarps, "the fused tail assumes the 4-warp layout");
  using C = Cfg<T, D, W>;
  constexpr int E = C::E, LPR = C::LPR, RPW = C::RPW, U = C::U, TK = C::TK;
  constexpr int RW = RPW * U;  // rows per warp per tile (<= 32)
  static_assert(RW <= 32, "one key per lane in the decision phase");
  // Tensor-core scores for 16-bit T; the K ring is then XOR-swizzled by 16-byte chunk
  // (chunk c of row r at c ^ (r & 7)) so ldmatrix reads are free of bank conflicts.
  constexpr bool kMma = TOPT_DECODE_MMA && sizeof(T) == 2 && kMode != kPost;
  static_assert(!kMma || (RW % 16 == 0 && D % 16 == 0 && GM <= 8), "mma tile shape");
  static_assert(kMma || kMode == kPost || (GM & (GM - 1)) == 0, "the FFMA scores split the heads in halves");
  static_assert(!kFuse || kMode == kPre, "only the one-pass kernel merges its splits");
  constexpr int SCW = TK + 4;  // sc row stride: the mma lanes' stores hit distinct banks
  // 128-byte aligned: the ring follows the static arrays, and at a 16-byte (not 32-byte) offset every
  // cp.async of a K row asked L2 for twice the sectors (ncu, 9/3 heads: 3.2M → 6.3M; 10% slower).
  extern __shared__ __align__(128) char kring_raw[];  // K tiles: [kStages][TK][D] T
  T* kring = reinterpret_cast<T*>(kring_raw);
  // scores of the tile (warp w: its rows); with mma, rows for all 8 of its columns (heads G..7 are
  // padding), so every lane stores its fragment without a branch
  __shared__ float sc[kMma ? 8 : GM][SCW];
  __shared__ float wts[2][GM][TK];       // e_j of kept keys, 0 otherwise (by tile parity)
  __shared__ __align__(16) unsigned char idx[kWarps][32];  // a warp's kept rows of the current tile (warp-local)
  __shared__ float gstat[GM][2];         // kPost: global mx, Z per head
  __shared__ float head_n[GM];           // n of each head's row
  __shared__ float red[kWarps];
  __shared__ float wpart[kWarps][6][GM];  // per-warp m, Z, D, dropped, kept, nan
  // per-warp acc (relative to its m); kPre stages it in the K ring, free by then
  __shared__ float accs_own[kMode == kPre ? 1 : kWarps][GM][D];
  static_assert(kMode != kPre || kWarps * GM * D * 4 <= kStages * TK * D * int(sizeof(T)), "accs fit in the ring");
  float(*accs)[GM][D] = kMode == kPre ? reinterpret_cast<float(*)[GM][D]>(kring_raw) : accs_own;

  // Launched with PDL: the CTAs are resident by the time the kernel before ends. Everything below
  // waits for its results, except, after the GQA decode front, the first K tiles of the past.
  // The instance for calls without a mask (kMasked false) compiles the mask's paths out: 23% fewer
  // instructions. At B = 1 the warps wait on instruction fetch (ncu; the K stream evicts the code
  // from L2), so fewer instructions make B = 1 nodes 5-8% faster.
  if constexpr (!kMasked) p.mask_kind = MaskKind::kNone;
  const int64_t trace_cta = blockIdx.x + int64_t(gridDim.x) * (blockIdx.y + int64_t(gridDim.y) * blockIdx.z);
  if constexpr (kMode != kScores) Stamp(ws.trace_slot, 0, trace_cta, 0);
  if constexpr (kMode != kPost) {
    // Before the PDL wait, this warp's first kStages statically dealt K tiles (a 4 KB warp tile: one
    // 128-byte line per lane) are prefetched into L2, so that their DRAM latency overlaps the kernel
    // before (the merge triggers early). L2 is the GPU's point of coherence: a line the kernel before
    // writes after the prefetch is read new after the wait all the same. The rows lie in the past
    // buffer [B, Hkv, P, Dh] whatever the row lengths (which the wait guards). H100, harness, one call
    // with the L2 window and the merge's trigger: B = 1 32/8/128 32K 0.0335 -> 0.0313 ms
    // (bench/results/step_h100_session29).
    if (!p.after_decode_front) {
      if (p.past_key) {
        const char* k_bg = static_cast<const char*>(p.past_key) + (int64_t(blockIdx.z) * p.Hkv + blockIdx.y) * p.P * int64_t(D * sizeof(T));
#pragma unroll
        for (int st = 0; st < kStages; ++st) {
          const int64_t k0 = int64_t((int(blockIdx.x) + st * int(gridDim.x)) * W + int(threadIdx.x >> 5)) * RW;
          if (k0 + RW <= p.P) PrefetchL2(k_bg + k0 * int64_t(D * sizeof(T)) + (threadIdx.x & 31) * 128);
        }
      }
      WaitPrerequisite();
    }
  }
  const int s = blockIdx.x, splits = gridDim.x;
  const int64_t g = blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int G = int(p.Hq / p.Hkv);
  const KvGeom geo = GetGeom(p, b);
  const int64_t n_keys = RowEnd(p, geo, 0);  // keys [0, n_keys) before the mask
  int64_t lo, hi;  // kPost's keys and the stale V sum's rows: a contiguous range
  SplitRange(n_keys, s, splits, TK, lo, hi);
  // The tile loop (kPre, kScores) runs each warp over warp tiles of RW keys (warp tile w: keys
  // [w·RW, w·RW + RW)) through its own slice of the K ring. Its it-th is dealt statically,
  // (s + it·splits)·kWarps + warp: the CTA's warps take neighbours and the splits stripe the row,
  // since real rows keep runs of keys (the first ones and the latest) that contiguous ranges hand
  // to a few splits (ncu, real step: busiest SM 17% above the mean; 4% with spread rows). kPre deals
  // only the first kStages so; a warp claims each later one from the (b, g) counter, so warps that
  // run ahead (an SM with fewer CTAs, fewer kept rows) take more, and the splits end together
  // (static: the busiest SM ran 11% above the mean).
  const int n_wt = int((n_keys + RW - 1) / RW);
  constexpr bool kClaim = kClaimed && kMode == kPre;
  // The claiming instance (kClaim, chosen by ClaimsPay) deals the first st_its = kStages of each
  // warp's tiles statically (they fill the ring), the rest [wt_static, n_wt) by claims, where this
  // row leaves each warp several to claim: a warp learns that its row is done from a claim's answer.
  const int wt_dealt = kStages * splits * kWarps;
  const bool claiming = kClaim && ClaimsPay(n_wt, splits);
  const int st_its = claiming ? kStages : 0x7fffffff;
  const int wt_static = claiming ? wt_dealt : 0;
  auto static_wt = [&](int it) { return (s + it * splits) * kWarps + warp; };
  unsigned* claims = ws.tiles + (b * p.Hkv + g) * kClaimStride;
  const int64_t key_end = kMode == kPost ? hi : n_keys;
  const int64_t unit = ((b * p.Hkv + g) * splits + s) * G;  // first (split, head) unit of this CTA
  const int row0 = warp * RW;

  // Element offset of 16-byte chunk c of tile row `row` in a K stage.
  auto Swz = [](int row, int c) { return row * D + (kMma ? (c ^ (row & 7)) : c) * E; };
  // K ring: tile `it` → stage it % kStages. Each warp copies its own rows [row0, row0 + RW) (lane:
  // 16-byte chunks lane, lane + 32, ...) and alone reads them, so a tile needs no CTA barrier: a
  // warp held up by its V gathers does not hold up the others.
  // A lane copies chunks lane + 32·u (u < U) of its warp's RW·LPR: tile row row0 + lane / LPR + u·RPW,
  // column lane % LPR. row0 is a multiple of 8 and RPW divides 8, so the swizzle's (row & 7) is
  // (lane / LPR) ^ ((u·RPW) & 7): each copy's offset in a stage is one per-lane constant XOR a
  // constant, plus a constant, and its source the tile's start plus lane·16 + u·512 bytes. (Written
  // through Swz, ptxas recomputed ~130 instructions of addresses per tile: ncu, 574 per warp tile.)
  const unsigned ring_addr = static_cast<unsigned>(__cvta_generic_to_shared(kring));
  const unsigned cp_off = unsigned(Swz(row0 + lane / LPR, lane % LPR) * int(sizeof(T)));
  const char* k_past = reinterpret_cast<const char*>(static_cast<const T*>(p.past_key) + (b * p.Hkv + g) * geo.past_len * D + lane * E);
  // ldmatrix.x4 of (16-key block mb, 16-dim step ks): lane reads row row0 + 16·mb + (lane & 7) +
  // 8·(mq & 1), chunk 2·ks + (mq >> 1) (mq = lane / 8); (row & 7) = (lane & 7), so its offset is
  // ld_off ^ (32·ks) + 16·mb rows.
  const unsigned ld_off = unsigned(Swz(row0 + (lane & 7) + ((lane >> 3) & 1) * 8, lane >> 4) * int(sizeof(T)));
  // Copies warp tile `wt` into stage it % kStages (this warp's rows of it), then commits a group.
  auto issue = [&](int wt, int it) {
    if (wt < n_wt) {
      const int64_t k0 = int64_t(wt) * RW;
      T* stage = kring + (it % kStages) * TK * D;
      if (k0 + RW <= min(key_end, geo.past_rows)) {  // all in the past buffer
        const char* src = k_past + k0 * (D * int64_t(sizeof(T)));
        const unsigned dst = ring_addr + unsigned(it % kStages) * unsigned(TK * D * int(sizeof(T)));
#pragma unroll
        for (int u = 0; u < U; ++u) {
          constexpr unsigned kRowBytes = D * sizeof(T);
          const unsigned swz = kMma ? unsigned((u * RPW) & 7) * 16u : 0u;
          CpAsync16(dst + ((cp_off ^ swz) + unsigned(u * RPW) * kRowBytes), src + u * 512);
        }
      } else {
#pragma unroll
        for (int i = lane; i < RW * LPR; i += 32) {
          const int c = i % LPR;
          const int64_t j = k0 + i / LPR;
          const bool ok = j < key_end;
          CpAsync16(stage + Swz(row0 + i / LPR, c),
                    KvRow<T>(p.past_key, p.k_new, p, geo, b, g, ok ? j : k0, D) + c * E, ok);
        }
      }
    }
    CpAsyncCommit();
  };
  int wts_of[kStages];  // warp tiles of the ring's next stages: it, it + 1, ... (warp-uniform)
  // lane 0 (kClaim): claims in flight, claimq[i] for stage it + kStages + i; a claim is made
  // kAhead tiles before its use, so its round trip to L2 hides behind the tiles' work.
  constexpr int kAhead = TOPT_DECODE_CLAIM_AHEAD;
  int claimq[kAhead];
  auto claim = [&](int stage_it, int& slot) {
    if (kClaim && lane == 0 && stage_it >= st_its) slot = int(AtomicAddNoWait(claims));  // wt_static added at the use: an add here would await the atomic
  };
  // Per-head row constants (uniform across the CTA). They read only inputs the GQA decode front
  // does not write (seqlens_k, the mask, the tables), so kPre/kScores find them before the PDL wait
  // with the first K tiles in flight.
  float theta[GM];
  bool dense[GM], row_nan[GM];
  auto find_rules = [&] {
    if (p.mask_kind == MaskKind::kNone && p.L <= 4 * kThreads) {  // every head's n is the row's length
      ThetasOneRound<GM, W>(p, g * G, G, n_keys, theta);
#pragma unroll
      for (int r = 0; r < GM; ++r) {
        dense[r] = n_keys <= p.k;
        row_nan[r] = false;
        if (tid == 0) head_n[r] = float(n_keys);
      }
      return;
    }
    int64_t n_last = -1, column = 0;  // heads of one row length share the threshold column
#pragma unroll
    for (int r = 0; r < GM; ++r) {
      const int64_t h = g * G + (r < G ? r : 0);
      const int64_t n = CountVisible<T, W>(p, n_keys, b, h, red);
      if (n != n_last) { column = ThetaColumnWarp(p, n); n_last = n; }
      const RowRule rule = RuleAt(p, h, n, column);
      theta[r] = rule.theta;
      dense[r] = rule.dense;
      row_nan[r] = false;
      if (tid == 0) head_n[r] = float(n);
    }
  };
  if constexpr (kMode != kPost) {
#pragma unroll
    for (int st = 0; st < kStages; ++st) wts_of[st] = static_wt(st);
    // After the decode front, the ring's first tiles are copied before the wait when all of them
    // lie in the past buffer (the front writes the new row): their loads overlap the front's run.
    bool early = p.after_decode_front;
#pragma unroll
    for (int st = 0; st < kStages - 1; ++st)
      early = early && (wts_of[st] >= n_wt || int64_t(wts_of[st] + 1) * RW <= min(key_end, geo.past_rows));
    if (p.after_decode_front && !early) WaitPrerequisite();
#pragma unroll
    for (int st = 0; st < kStages - 1; ++st) issue(wts_of[st], st);
#pragma unroll
    for (int i = 0; i + 1 < kAhead; ++i) claim(kStages + i, claimq[i]);
    find_rules();
    if (early) WaitPrerequisite();
  }

  if constexpr (kMode == kPost) find_rules();

  float gZ[GM];
  if constexpr (kMode == kPost) {  // global mx and Z per head from pass 1's partials
    WaitPrerequisite();
    for (int r = warp; r < G; r += kWarps) {
      float m = -INFINITY, nan = 0.f;
      for (int t = lane; t < splits; t += 32) {
        const float* pf = ws.p1 + (((b * p.Hkv + g) * splits + t) * G + r) * kPartF;
        m = fmaxf(m, pf[kM]);
        nan = fmaxf(nan, pf[kNanF]);
      }
      m = WarpMax(m);
      nan = WarpMax(nan);
      float z = 0.f;
      for (int t = lane; t < splits; t += 32) {
        const float* pf = ws.p1 + (((b * p.Hkv + g) * splits + t) * G + r) * kPartF;
        if (pf[kM] != -INFINITY) z += pf[kZ] * expf(pf[kM] - m);
      }
      z = WarpSum(z);
      if (lane == 0) { gstat[r][0] = m; gstat[r][1] = nan > 0.f ? NAN : z; }
    }
    __syncthreads();
  }

  // q of this lane's 16-byte column chunk, scaled: q[r][e] = scale · Q[b, g·G + r, 0, c·E + e].
  const int col = lane % LPR, sub = lane / LPR;
  float q[GM][E];
  unsigned qb[kMma ? D / 16 : 1][2];  // mma B fragments: head lane / 4, dims 16·ks + 2·(lane % 4) (+8)
  if constexpr (kMma) {
    const int hq = lane >> 2, kq = (lane & 3) * 2;
    const T* qrow = static_cast<const T*>(p.q) + (b * p.Hq + g * G + (hq < G ? hq : 0)) * D;
#pragma unroll
    for (int ks = 0; ks < (kMma ? D / 16 : 1); ++ks) {
      qb[ks][0] = hq < G ? *reinterpret_cast<const unsigned*>(qrow + ks * 16 + kq) : 0u;
      qb[ks][1] = hq < G ? *reinterpret_cast<const unsigned*>(qrow + ks * 16 + kq + 8) : 0u;
    }
  } else if constexpr (kMode != kPost) {
#pragma unroll
    for (int r = 0; r < GM; ++r) {
      const int rr = r < G ? r : 0;
      const uint4 u = *reinterpret_cast<const uint4*>(static_cast<const T*>(p.q) + (b * p.Hq + g * G + rr) * D + col * E);
      Unpack16<T>(u, q[r]);
#pragma unroll
      for (int e = 0; e < E; ++e) q[r][e] *= p.scale;
    }
  }

  // Running per-head state: max (warp-uniform; per lane in kScores) and lane partial sums.
  float m_run[GM], z_t[GM], d_t[GM], drop_t[GM];
  int kept_t[GM];
  bool nan_t[GM];
#pragma unroll
  for (int r = 0; r < GM; ++r) {
    if constexpr (kMode == kPost) {
      m_run[r] = r < G ? gstat[r][0] : 0.f;
      gZ[r] = r < G ? gstat[r][1] : 1.f;
      row_nan[r] = isnan(gZ[r]);
    } else {
      m_run[r] = -INFINITY;
    }
    z_t[r] = d_t[r] = drop_t[r] = 0.f;
    kept_t[r] = 0;
    nan_t[r] = false;
  }
  float acc[GM][E];
#pragma unroll
  for (int r = 0; r < GM; ++r)
#pragma unroll
    for (int e = 0; e < E; ++e) acc[r][e] = 0.f;
  int unions = 0;  // this warp's union count

  // V rows of the previous tile in flight: lane group `sub` holds kept rows sub, sub + RPW, ...
  constexpr int UV = 4;  // 8 (every row of a warp in flight): 168 registers, 14% more instructions, slower
  uint4 pend_v[UV];
  int pend_k[UV];
#pragma unroll
  for (int u = 0; u < UV; ++u) pend_k[u] = -1;
  auto consume = [&](int buf, const float* scale) {
#pragma unroll
    for (int u = 0; u < UV; ++u) {
      if (pend_k[u] < 0) continue;
      float vf[E];
      Unpack16<T>(pend_v[u], vf);
#pragma unroll
      for (int r = 0; r < GM; ++r) {
        const float w = r < G ? wts[buf][r][pend_k[u]] * scale[r] : 0.f;
#pragma unroll
        for (int e = 0; e < E; ++e) acc[r][e] = fmaf(w, vf[e], acc[r][e]);
      }
      pend_k[u] = -1;
    }
  };
  auto vrow = [&](int64_t t0, int k) {  // V row of key t0 + k (tile row k) at this lane's column chunk
    if (t0 + row0 + RW <= geo.past_rows)
      return static_cast<const T*>(p.past_value) + ((b * p.Hkv + g) * geo.past_len + t0 + k) * D + col * E;
    return KvRow<T>(p.past_value, p.v_new, p, geo, b, g, t0 + k, D) + col * E;
  };

  // kPost reads stored scores, so no key's work waits on another's: a chunk's score loads are
  // issued at once, each warp compacts its kept keys, then gathers their V rows UV at a time with
  // the next chunk's scores already in flight — a few memory round trips per chunk of CK keys,
  // where the tile loop below pays about one per tile.
  if constexpr (kMode == kPost) {
    constexpr int SPT = GM <= 4 ? 8 : 4, CK = kThreads * SPT, LW = 32 * SPT;  // scores/thread, keys/chunk, list/warp
    constexpr int UVP = 8;  // V rows in flight per lane group
    __shared__ unsigned short klist[kWarps][LW];  // chunk offsets of the warp's kept keys
    __shared__ float wlist[kWarps][GM][LW];       // their e_j per head (0 where the head drops the key)
    const float* sbase = ws.scores + (b * p.Hq + g * G) * ws.tbuf;
    float sreg[SPT][GM];
    auto load_scores = [&](int64_t c0) {
#pragma unroll
      for (int i = 0; i < SPT; ++i) {
        const int64_t j = c0 + i * kThreads + tid;
#pragma unroll
        for (int r = 0; r < GM; ++r) sreg[i][r] = (j < hi && r < G) ? __ldcs(sbase + r * ws.tbuf + j) : -INFINITY;
      }
    };
    load_scores(lo);
    for (int64_t c0 = lo; c0 < hi; c0 += CK) {
      int count = 0;
#pragma unroll
      for (int i = 0; i < SPT; ++i) {
        const int off = i * kThreads + tid;  // warp w holds offsets i·kThreads + 32w + lane
        const int64_t j = c0 + off;
        bool any = false;
        float w[GM];
#pragma unroll
        for (int r = 0; r < GM; ++r) {
          float add;
          const bool vis = j < hi && r < G &&
                           (p.mask_kind == MaskKind::kNone || MaskVisible<T>(p, MaskBase(p, b, g * G + r, 0), j, add));
          w[r] = 0.f;
          if (!vis) continue;
          const float a = sreg[i][r];
          if (isnan(a)) nan_t[r] = true;
          const float e = isnan(a) ? 0.f : __expf(a - m_run[r]);
          const bool keep = dense[r] || row_nan[r] || e / gZ[r] > theta[r];
          z_t[r] += e;
          if (keep) { w[r] = e; d_t[r] += e; kept_t[r] += 1; any = true; }
          else drop_t[r] += e;
        }
        const unsigned bal = __ballot_sync(0xffffffffu, any);
        if (any) {
          const int pos = count + __popc(bal & ((1u << lane) - 1u));
          klist[warp][pos] = static_cast<unsigned short>(off);
#pragma unroll
          for (int r = 0; r < GM; ++r) wlist[warp][r][pos] = w[r];
        }
        count += __popc(bal);
      }
      unions += count;
      __syncwarp();
      if (c0 + CK < hi) load_scores(c0 + CK);
      const bool all_past = c0 + CK <= geo.past_rows;
      for (int c = sub; c < count; c += RPW * UVP) {
        uint4 v[UVP];
#pragma unroll
        for (int u = 0; u < UVP; ++u) {
          const int x = c + u * RPW;
          if (x >= count) continue;
          const int64_t j = c0 + klist[warp][x];
          const T* row = all_past ? static_cast<const T*>(p.past_value) + ((b * p.Hkv + g) * geo.past_len + j) * D
                                  : KvRow<T>(p.past_value, p.v_new, p, geo, b, g, j, D);
          v[u] = __ldcs(reinterpret_cast<const uint4*>(row + col * E));
        }
#pragma unroll
        for (int u = 0; u < UVP; ++u) {
          const int x = c + u * RPW;
          if (x >= count) continue;
          float vf[E];
          Unpack16<T>(v[u], vf);
#pragma unroll
          for (int r = 0; r < GM; ++r) {
            if (r >= G) continue;
            const float wr = wlist[warp][r][x];
#pragma unroll
            for (int e = 0; e < E; ++e) acc[r][e] = fmaf(wr, vf[e], acc[r][e]);
          }
        }
      }
      __syncwarp();  // the lists are rewritten by the next chunk
    }
  }

  if constexpr (kMode != kPost) {  // kPre, kScores: the K tiles through the cp.async ring
    // Next stage's warp tiles: one along, and the claimed (or dealt) one for it + kStages - 1.
    auto advance = [&](int it) {
#pragma unroll
      for (int st = 0; st + 1 < kStages; ++st) wts_of[st] = wts_of[st + 1];
      wts_of[kStages - 1] = it + kStages - 1 < st_its ? static_wt(it + kStages - 1) : wt_static + __shfl_sync(0xffffffffu, claimq[0], 0);
#pragma unroll
      for (int i = 0; i + 1 < kAhead; ++i) claimq[i] = claimq[i + 1];
    };
    int it = 0;
    for (; wts_of[0] < n_wt; ++it, advance(it)) {
      const int64_t t0 = int64_t(wts_of[0]) * RW - row0;  // key of tile row 0: this warp's rows are row0..
      const int buf = it & 1;
      // 1) scores of this warp's rows.
      float a_r[GM];
      {
        CpAsyncWait<kStages - 2>();
        __syncwarp();  // this warp's rows of tile `it` landed for every lane; its rows of tile it-1 are free
        issue(wts_of[kStages - 1], it + kStages - 1);
        claim(it + kStages + kAhead - 1, claimq[kAhead - 1]);
        const T* stage = kring + (it % kStages) * TK * D;
        if constexpr (kMma) {
          const unsigned sbase = ring_addr + unsigned(it % kStages) * unsigned(TK * D * int(sizeof(T)));
          const int gk = lane >> 2, hq = (lane & 3) * 2;
#pragma unroll
          for (int mb = 0; mb < RW / 16; ++mb) {
            const int rbase = row0 + mb * 16;
            float c[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
            for (int ks = 0; ks < (kMma ? D / 16 : 1); ++ks) {
              unsigned a[4];
              LdMatrixX4(a, sbase + ((ld_off ^ unsigned(ks * 32)) + unsigned(mb * 16 * D) * unsigned(sizeof(T))));
              Mma16816<T>(c, a, qb[ks][0], qb[ks][1]);
            }
            sc[hq][rbase + gk] = c[0] * p.scale;
            sc[hq][rbase + gk + 8] = c[2] * p.scale;
            sc[hq + 1][rbase + gk] = c[1] * p.scale;
            sc[hq + 1][rbase + gk + 8] = c[3] * p.scale;
          }
        } else {
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int row = row0 + u * RPW + sub;
          float kf[E];
          Unpack16<T>(*reinterpret_cast<const uint4*>(stage + row * D + col * E), kf);
          float v[GM];
#pragma unroll
          for (int r = 0; r < GM; ++r) {
            v[r] = 0.f;
#pragma unroll
            for (int e = 0; e < E; ++e) v[r] = fmaf(q[r][e], kf[e], v[r]);
          }
          // Reduce over the LPR lanes of the row while splitting the heads: at each of the first
          // log2(GM) levels a lane keeps half of its heads; lane col ends with head col / (LPR/GM).
#pragma unroll
          for (int n = GM, o = LPR / 2; n > 1; n >>= 1, o >>= 1) {
            const bool up = (col & o) != 0;
#pragma unroll
            for (int k = 0; k < n / 2; ++k) {
              const float send = up ? v[k] : v[k + n / 2], keep = up ? v[k + n / 2] : v[k];
              v[k] = keep + __shfl_xor_sync(0xffffffffu, send, o);
            }
          }
#pragma unroll
          for (int o = LPR / (2 * GM); o > 0; o >>= 1) v[0] += __shfl_xor_sync(0xffffffffu, v[0], o);
          if (col % (LPR / GM) == 0 && col / (LPR / GM) < G) sc[col / (LPR / GM)][row] = v[0];
        }
        }
        __syncwarp();
#pragma unroll
        for (int r = 0; r < GM; ++r) a_r[r] = lane < RW ? sc[r][row0 + lane] : -INFINITY;
      }

      // 2) decisions: lane < RW owns key j = t0 + row0 + lane.
      const int64_t j = t0 + row0 + lane;
      const bool in = lane < RW && j < key_end;
      bool vis_r[GM];
      if (p.mask_kind == MaskKind::kNone) {  // one warp-uniform branch per tile, not one per head
#pragma unroll
        for (int r = 0; r < GM; ++r) vis_r[r] = in && r < G;
      } else {
#pragma unroll
        for (int r = 0; r < GM; ++r) {
          float add = 0.f;
          vis_r[r] = in && r < G && MaskVisible<T>(p, MaskBase(p, b, g * G + r, 0), j, add);
          a_r[r] += add;
        }
      }
#pragma unroll
      for (int r = 0; r < GM; ++r) a_r[r] = vis_r[r] ? a_r[r] : -INFINITY;
      if constexpr (kMode == kScores) {
#pragma unroll
        for (int r = 0; r < GM; ++r) {
          if (!vis_r[r]) continue;
          const float a = a_r[r];
          ws.scores[(b * p.Hq + g * G + r) * ws.tbuf + j] = a;
          if (isnan(a)) { nan_t[r] = true; continue; }
          if (a == -INFINITY) continue;
          if (a > m_run[r]) { z_t[r] = z_t[r] * __expf(m_run[r] - a) + 1.f; m_run[r] = a; }
          else z_t[r] += __expf(a - m_run[r]);
        }
        __syncwarp();  // sc rows of this warp are rewritten next tile
        continue;
      } else {
        float alpha[GM];
#pragma unroll
        for (int r = 0; r < GM; ++r) alpha[r] = 1.f;
        bool rescaled = false;  // warp-uniform
        if constexpr (kMode == kPre) {
          // The reference m_run (warp-uniform) moves only when a score passes it by more than
          // kRefSlack, so e^(a - m_run) <= e^kRefSlack stays far from overflow, and most tiles skip
          // the warp max and the rescale of acc, Z, D: exact, since every sum shares the reference.
          bool over = false;
#pragma unroll
          for (int r = 0; r < GM; ++r) over |= a_r[r] > m_run[r] + kRefSlack;
          if (__any_sync(0xffffffffu, over)) {
            rescaled = true;
#pragma unroll
            for (int r = 0; r < GM; ++r) {
              const float mn = fmaxf(m_run[r], WarpMax(a_r[r]));
              alpha[r] = mn == -INFINITY ? 1.f : __expf(m_run[r] - mn);
              m_run[r] = mn;
              z_t[r] *= alpha[r];
              d_t[r] *= alpha[r];
              drop_t[r] *= alpha[r];
            }
          }
        }
        bool any = false;
#pragma unroll
        for (int r = 0; r < GM; ++r) {  // selects, no branches: a = -inf where not visible
          const float a = a_r[r];
          const bool nan = isnan(a);
          const float e = vis_r[r] && !nan ? ExpFtz(a - m_run[r]) : 0.f;
          const bool keep = vis_r[r] && (dense[r] || row_nan[r] || a > theta[r]);
          nan_t[r] = nan_t[r] || nan;
          z_t[r] += e;
          d_t[r] += keep ? e : 0.f;
          drop_t[r] += keep ? 0.f : e;
          kept_t[r] += keep ? 1 : 0;
          any = any || keep;
          if (r < G && lane < RW) wts[buf][r][row0 + lane] = keep ? e : 0.f;
        }
        // 3) this warp's kept rows: ballot → compacted list.
        const unsigned bal = __ballot_sync(0xffffffffu, any);
        const int count = __popc(bal);
        if (any) idx[warp][__popc(bal & ((1u << lane) - 1u))] = static_cast<unsigned char>(row0 + lane);
        unions += count;
        __syncwarp();

        // 4) rescale, finish the previous tile's rows, gather this tile's (first UV·RPW rows in
        // flight until the next tile; the rest now).
        if (kMode == kPre && rescaled) {
#pragma unroll
          for (int r = 0; r < GM; ++r)
#pragma unroll
            for (int e = 0; e < E; ++e) acc[r][e] *= alpha[r];
        }
        consume(buf ^ 1, alpha);
        // the rest now, UV rows in flight per round: real rows keep whole runs of keys (the
        // first and the latest ones), so a tile can keep all 32 of a warp's rows
        for (int c0 = sub + RPW * UV; c0 < count; c0 += RPW * UV) {
          uint4 now_v[UV];
          int now_k[UV];
#pragma unroll
          for (int u = 0; u < UV; ++u) {
            const int c = c0 + u * RPW;
            now_k[u] = c < count ? idx[warp][c] : -1;
            if (now_k[u] >= 0) now_v[u] = __ldcs(reinterpret_cast<const uint4*>(vrow(t0, now_k[u])));
          }
#pragma unroll
          for (int u = 0; u < UV; ++u) {
            if (now_k[u] < 0) continue;
            float vf[E];
            Unpack16<T>(now_v[u], vf);
#pragma unroll
            for (int r = 0; r < GM; ++r) {
              const float w = r < G ? wts[buf][r][now_k[u]] : 0.f;
#pragma unroll
              for (int e = 0; e < E; ++e) acc[r][e] = fmaf(w, vf[e], acc[r][e]);
            }
          }
        }
        if constexpr (RPW == 4 && UV == 4) {  // 16-bit, Dh 64: lane group sub's rows sub + 4u are byte sub
          // of idx's words 0..3 (one 16-byte read), and a tile in the past buffer needs no KvRow
          const uint4 w4 = *reinterpret_cast<const uint4*>(idx[warp]);
          const unsigned words[4] = {w4.x, w4.y, w4.z, w4.w};
#pragma unroll
          for (int u = 0; u < UV; ++u) pend_k[u] = sub + 4 * u < count ? int((words[u] >> (8 * sub)) & 0xffu) : -1;
          if (t0 + row0 + RW <= geo.past_rows) {
            const T* vtile = static_cast<const T*>(p.past_value) + ((b * p.Hkv + g) * geo.past_len + t0) * D + col * E;
#pragma unroll
            for (int u = 0; u < UV; ++u)
              if (pend_k[u] >= 0) pend_v[u] = __ldcs(reinterpret_cast<const uint4*>(vtile + pend_k[u] * D));
          } else {
#pragma unroll
            for (int u = 0; u < UV; ++u)
              if (pend_k[u] >= 0) pend_v[u] = __ldcs(reinterpret_cast<const uint4*>(vrow(t0, pend_k[u])));
          }
        } else {  // (the same for Dh 128 spilled registers in its loop)
#pragma unroll
          for (int u = 0; u < UV; ++u) {
            const int c = sub + u * RPW;
            pend_k[u] = c < count ? idx[warp][c] : -1;
            if (pend_k[u] >= 0) pend_v[u] = __ldcs(reinterpret_cast<const uint4*>(vrow(t0, pend_k[u])));
          }
        }
        __syncwarp();  // idx/sc of this warp are rewritten next tile
      }
    }
    if constexpr (kMode == kPre) {
      float one[GM];
#pragma unroll
      for (int r = 0; r < GM; ++r) one[r] = 1.f;
      consume((it + 1) & 1, one);  // the last tile's rows
    }
  }
  if constexpr (kMode != kPost) CpAsyncWait<0>();
  if constexpr (kMode != kScores) Stamp(ws.trace_slot, 0, trace_cta, 1 + warp, true);
  LaunchDependents();  // the next kernel (pass 2 / merge) may start launching during the epilogue

  // Per-warp totals (kScores: lanes' maxima differ, rescale to the warp max first).
#pragma unroll
  for (int r = 0; r < GM; ++r) {
    float m = m_run[r], z = z_t[r];
    if constexpr (kMode == kScores) {
      const float wm = WarpMax(m);
      z = m == -INFINITY ? 0.f : z * __expf(m - wm);
      m = wm;
    }
    const float zs = WarpSum(z), ds = WarpSum(d_t[r]), dr = WarpSum(drop_t[r]);
    const float kc = WarpSum(float(kept_t[r])), nn = WarpMax(nan_t[r] ? 1.f : 0.f);
    if (lane == 0) {
      wpart[warp][0][r] = m; wpart[warp][1][r] = zs; wpart[warp][2][r] = ds;
      wpart[warp][3][r] = dr; wpart[warp][4][r] = kc; wpart[warp][5][r] = nn;
    }
  }
  if constexpr (kMode != kScores) {  // acc: sum the RPW lane groups, then stage per warp
#pragma unroll
    for (int r = 0; r < GM; ++r)
#pragma unroll
      for (int e = 0; e < E; ++e)
#pragma unroll
        for (int o = LPR; o < 32; o <<= 1) acc[r][e] += __shfl_xor_sync(0xffffffffu, acc[r][e], o);
    if constexpr (kMode == kPre) __syncthreads();  // every warp is done reading the ring
    if (sub == 0) {
#pragma unroll
      for (int r = 0; r < GM; ++r)
        if (r < G)
#pragma unroll
          for (int e = 0; e < E; ++e) accs[warp][r][col * E + e] = acc[r][e];
    }
  }
  const int wunions = __shfl_sync(0xffffffffu, unions, 0);
  if (lane == 0) red[warp] = float(wunions);
  __syncthreads();

  // CTA totals: rescale each warp's sums to the CTA max per head.
  float* part = (kMode == kScores ? ws.p1 : ws.part);
  if (tid < G) {
    const int r = tid;
    float M = -INFINITY;
    for (int w = 0; w < kWarps; ++w) M = fmaxf(M, wpart[w][0][r]);
    float tot[5] = {0.f, 0.f, 0.f, 0.f, 0.f}, uni = 0.f;
    for (int w = 0; w < kWarps; ++w) {
      const float f = wpart[w][0][r] == -INFINITY ? 0.f : __expf(wpart[w][0][r] - M);
      tot[0] += f * wpart[w][1][r];
      tot[1] += f * wpart[w][2][r];
      tot[2] += f * wpart[w][3][r];
      tot[3] += wpart[w][4][r];
      tot[4] = fmaxf(tot[4], wpart[w][5][r]);
      uni += red[w];
    }
    float* pf = part + (unit + r) * kPartF;
    pf[kM] = M;
    pf[kZ] = tot[0];
    pf[kD] = tot[1];
    pf[kDrop] = tot[2];
    pf[kKeptF] = tot[3];
    pf[kUnionF] = uni;
    pf[kNanF] = tot[4];
    pf[kNF] = head_n[r];
  }
  if constexpr (kMode != kScores) {
    for (int x = tid; x < G * D; x += kThreads) {
      const int r = x / D, d = x % D;
      float M = -INFINITY;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) M = fmaxf(M, wpart[w][0][r]);
      float t = 0.f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w)
        if (wpart[w][0][r] != -INFINITY) t += __expf(wpart[w][0][r] - M) * accs[w][r][d];
      ws.acc[(unit + r) * D + d] = t;
    }
    if (UsesVSumState(p)) {  // a stale running V sum (first step after a prompt): this split's share of V's past rows
      const int64_t past = geo.past_rows;
      if (past > 0 && !VSumStateFresh(p, geo, b)) {
        constexpr int CH = D / E, RG = 32 / CH < 1 ? 1 : 32 / CH;  // 16-byte chunks per row; row groups per warp
        const int c = lane % CH, rg = warp * RG + lane / CH;
        float sum[E];
#pragma unroll
        for (int e = 0; e < E; ++e) sum[e] = 0.f;
        const T* base = static_cast<const T*>(p.past_value) + (b * p.Hkv + g) * geo.past_len * D + c * E;
        for (int64_t j = lo + rg; j < min(hi, past); j += kWarps * RG) {
          float x[E];
          Unpack16<T>(*reinterpret_cast<const uint4*>(base + j * D), x);
#pragma unroll
          for (int e = 0; e < E; ++e) sum[e] += x[e];
        }
#pragma unroll
        for (int o = CH; o < 32; o <<= 1)
#pragma unroll
          for (int e = 0; e < E; ++e) sum[e] += __shfl_xor_sync(0xffffffffu, sum[e], o);
        if (lane < CH) {
          float* out = ws.vsplit + (((b * p.Hkv + g) * splits + s) * kWarps + warp) * D + c * E;
#pragma unroll
          for (int e = 0; e < E; ++e) out[e] = sum[e];
        }
      }
    }
    if constexpr (kFuse) MergeTail<T, D, GM>(p, ws, splits, b, g, G, reinterpret_cast<float*>(kring_raw), head_n);
    Stamp(ws.trace_slot, 0, trace_cta, 5);
  }
}

constexpr int kMaxSplits = 1024;

// Partial sums of the visible V rows (decode row i = 0) for VMC without past_v_sum: grid
// (kVSumChunks, VSumHeads, B); chunk c of the visible range, one thread per column.
template <typename T>
__global__ void DecodeVSumKernel(TopThetaParams p, Ws ws) {
  const int64_t c = blockIdx.x, vh = blockIdx.y, b = blockIdx.z;
  const int64_t G = p.Hq / p.Hkv, h = VSumPerGroup(p) ? vh * G : vh, g = h / G, Dv = p.Dv;
  const KvGeom geo = GetGeom(p, b);
  const int64_t end = RowEnd(p, geo, 0), chunk = (end + kVSumChunks - 1) / kVSumChunks;
  const int64_t lo = min(end, c * chunk), hi = min(end, lo + chunk), mbase = MaskBase(p, b, h, 0);
  for (int64_t d = threadIdx.x; d < Dv; d += blockDim.x) {
    float sum = 0.f;
#pragma unroll 8
    for (int64_t j = lo; j < hi; ++j) {
      float add;
      if (MaskVisible<T>(p, mbase, j, add)) sum += ToF<T>(KvRow<T>(p.past_value, p.v_new, p, geo, b, g, j, Dv)[d]);
    }
    ws.vsum[((b * VSumHeads(p) + vh) * kVSumChunks + c) * Dv + d] = sum;
  }
}

// Merge the splits of (b, h) and write Y, stats and (for the group's first head) present_v_sum.
// grid (Hq, B), block kMergeThreads: 8 warps over the splits × 32 lanes of float4 columns (Dv <= 128).
// Launched with PDL: what does not depend on the split kernel (the row's rule without a mask, the
// running V sum and the new rows' V) is read before the wait; after it, one round of loads (each
// split's m and acc in the same pass, by an online max) and shared-memory reductions.
// MB: CTAs per SM the registers must allow. A grid larger than two per SM (B = 32 of 9 query heads:
// 288 CTAs) takes the instance capped at 64 registers, 4 per SM (528 on an H100), and merges in one
// wave: at 102 registers (2 per SM) its last 24 CTAs waited for the first ones to end
// (bench/decode_trace.py; the real B = 32 step's merge: 8.7 µs uncapped, 5.7 capped). Smaller
// grids (B = 1) keep the uncapped instance, 1.5-2 µs faster there (32/8 heads, 32K).
constexpr int kMergeThreads = 256;

template <typename T, int MB>
__global__ void __launch_bounds__(kMergeThreads, MB) DecodeMergeKernel(TopThetaParams p, Ws ws, int splits) {
  constexpr int NWM = kMergeThreads / 32;
  __shared__ float wmax[NWM];
  __shared__ float red[NWM][8];
  __shared__ float4 part[NWM][32];
  __shared__ float vbase[kMergeThreads];
  const int64_t h = blockIdx.x, b = blockIdx.y;
  Stamp(ws.trace_slot, 1, h + p.Hq * b, 0);
  // The next kernel (the next layer's split kernel, PDL-launched) may become resident now and
  // prefetch its first K tiles while this one runs; it waits for this one's results.
  LaunchDependents();
  const int64_t G = p.Hq / p.Hkv, g = h / G, r = h % G, Dv = p.Dv;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const KvGeom geo = GetGeom(p, b);
  const int64_t base_unit = (b * p.Hkv + g) * splits * G + r;  // unit of split s: base + s·G
  auto rec = [&](int s) { return ws.part + (base_unit + int64_t(s) * G) * kPartF; };

  // 1) Independent of the splits. Without a mask n is the row's length.
  int64_t n = p.mask_kind == MaskKind::kNone ? RowEnd(p, geo, 0) : -1;
  RowRule rule{};
  if (n >= 0) rule = WeightsRuleWarp(p, h, n);
  const bool state = UsesVSumState(p);
  const bool want_vs = p.vmc || (r == 0 && (p.present_v_sum || state));  // v̄ may be needed
  const bool stale = want_vs && state && !VSumStateFresh(p, geo, b);       // then it needs the splits' V sums
  const int64_t d = tid;  // this thread's column of Y (Dv <= kMergeThreads)
  float vs = 0.f;
  if (want_vs && !stale && d < Dv) vs = VSumAt<T>(p, ws, geo, b, g, h, d, state ? VSumStateAt(p, geo, b, g, d) : 0.f);

  if (r == 0) {  // the group's new K/V rows into present (at past_rows; in place or after the copy): the
    // split kernel reads them from k_new/v_new, never from present
    const int64_t rows = p.kv_layout == KvLayout::kSharedBuffer ? p.P : p.P + p.Skv;
    const int64_t bg = b * p.Hkv + g, es = p.dtype == DType::kFloat32 ? 4 : 2;
    for (int64_t x = tid; x < p.Skv * Dv * es / 4; x += kMergeThreads) {
      const int64_t sr = x / (Dv * es / 4), w = x % (Dv * es / 4);
      const int64_t dst = (bg * rows + geo.past_rows + sr) * Dv * es / 4 + w, src = (bg * p.Skv + sr) * Dv * es / 4 + w;
      if (p.present_key) static_cast<uint32_t*>(p.present_key)[dst] = static_cast<const uint32_t*>(p.k_new)[src];
      if (p.present_value) static_cast<uint32_t*>(p.present_value)[dst] = static_cast<const uint32_t*>(p.v_new)[src];
    }
  }
  WaitPrerequisite();
  Stamp(ws.trace_slot, 1, h + p.Hq * b, 1);
  if (r == 0 && tid == 0) ws.tiles[(b * p.Hkv + g) * kClaimStride] = 0u;  // the splits are done claiming tiles: zero for the next call
  // 2) One round of loads: threads t < splits take split t's record (m, Z, D, dropped, kept, union,
  // nan: two float4), issued first; warp w takes splits w, w + NWM, ...: m_s and acc_s (lane c:
  // columns 4c..4c+3) loaded together, a running max per warp.
  static_assert(kM == 0 && kZ == 1 && kD == 2 && kDrop == 3 && kKeptF == 4 && kUnionF == 5 && kNanF == 6, "record layout");
  // the record of split tid (a thread's further splits, where there are more than threads, are read
  // again below: registers for them would cost the kernel its one-wave occupancy)
  const float4 rf0 = tid < splits ? *reinterpret_cast<const float4*>(rec(tid)) : make_float4(-INFINITY, 0.f, 0.f, 0.f);
  const float4 rf1 = tid < splits ? *reinterpret_cast<const float4*>(rec(tid) + 4) : make_float4(0.f, 0.f, 0.f, 0.f);
  const int64_t nq = Dv / 4;
  float mw = -INFINITY;
  float4 a = make_float4(0.f, 0.f, 0.f, 0.f);
  for (int s0 = warp; s0 < splits; s0 += 4 * NWM) {
    float ms[4];
    float4 x[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const int s = s0 + u * NWM;
      ms[u] = s < splits ? rec(s)[kM] : -INFINITY;
      x[u] = s < splits && lane < nq ? *reinterpret_cast<const float4*>(ws.acc + (base_unit + int64_t(s) * G) * Dv + 4 * lane)
                                     : make_float4(0.f, 0.f, 0.f, 0.f);
    }
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      if (ms[u] == -INFINITY) continue;
      if (ms[u] > mw) {
        const float f = mw == -INFINITY ? 0.f : expf(mw - ms[u]);
        a.x *= f; a.y *= f; a.z *= f; a.w *= f;
        mw = ms[u];
      }
      const float f = expf(ms[u] - mw);
      a.x += f * x[u].x; a.y += f * x[u].y; a.z += f * x[u].z; a.w += f * x[u].w;
    }
  }
  Stamp(ws.trace_slot, 1, h + p.Hq * b, 2);
  float t[6] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f};  // Z, D, dropped, kept, union, nan
  if (lane == 0) wmax[warp] = mw;
  __syncthreads();
  float M = wmax[0];
  for (int w = 1; w < NWM; ++w) M = fmaxf(M, wmax[w]);
  if (mw != -INFINITY) {
    const float f = expf(mw - M);
    a.x *= f; a.y *= f; a.z *= f; a.w *= f;
  }
  part[warp][lane] = a;
  auto add_record = [&](const float4& r0, const float4& r1) {
    const float f = r0.x == -INFINITY ? 0.f : expf(r0.x - M);
    t[0] += f * r0.y;
    t[1] += f * r0.z;
    t[2] += f * r0.w;
    t[3] += r1.x;
    t[4] += r1.y;
    t[5] = fmaxf(t[5], r1.z);
  };
  add_record(rf0, rf1);
  for (int s = tid + kMergeThreads; s < splits; s += kMergeThreads)
    add_record(*reinterpret_cast<const float4*>(rec(s)), *reinterpret_cast<const float4*>(rec(s) + 4));
#pragma unroll
  for (int k = 0; k < 6; ++k) t[k] = k == 5 ? WarpMax(t[k]) : WarpSum(t[k]);
  if (lane == 0)
#pragma unroll
    for (int k = 0; k < 6; ++k) red[warp][k] = t[k];
  __syncthreads();
#pragma unroll
  for (int k = 0; k < 6; ++k) {
    float v = red[0][k];
    for (int w = 1; w < NWM; ++w) v = k == 5 ? fmaxf(v, red[w][k]) : v + red[w][k];
    t[k] = v;
  }
  Stamp(ws.trace_slot, 1, h + p.Hq * b, 3);
  if (n < 0) {  // a mask: n is the count of visible keys the splits saw
    n = int64_t(rec(0)[kNF]);
    rule = WeightsRuleWarp(p, h, n);
  }
  const int64_t kept = t[5] > 0.f ? n : int64_t(t[3]);  // a NaN row keeps every visible key
  const OutWeights ow = RowWeights(p, rule, n, kept, M, t[5] > 0.f, t[0], t[1], t[2]);

  // 3) A stale running V sum (first step after a prefill, a rewind): the split kernel's
  // per-(split, warp) sums of V's past rows.
  if (stale) {  // block-uniform
    const int64_t groups = kMergeThreads / Dv, dd = tid % Dv, rg = tid / Dv, parts = int64_t(splits) * ws.split_warps;
    float sum = 0.f;
    if (rg < groups) {
      const float* part_sums = ws.vsplit + (b * p.Hkv + g) * parts * Dv + dd;
      for (int64_t x = rg; x < parts; x += groups) sum += part_sums[x * Dv];
    }
    vbase[tid] = sum;
    __syncthreads();
    if (tid < Dv)
      for (int64_t k = 1; k < groups; ++k) sum += vbase[tid + k * Dv];
    if (d < Dv) vs = VSumAt<T>(p, ws, geo, b, g, h, d, sum);
  }
  if (d < Dv) {
    float acc = 0.f;
    for (int w = 0; w < NWM; ++w) acc += reinterpret_cast<const float*>(&part[w][d / 4])[d % 4];
    const bool need_vs = ow.wv != 0.f || (r == 0 && (p.present_v_sum || state));
    if (need_vs && r == 0) StoreVSum(p, geo, b, g, d, vs);
    const float v = ow.nan ? NAN : ow.zero ? 0.f : ow.wa * acc + (ow.wv != 0.f ? ow.wv * vs : 0.f);
    static_cast<T*>(p.y)[(b * p.Hq + h) * Dv + d] = FromF<T>(v);
  }
  if (state && r == 0 && g == 0 && tid == 0) StoreVSumStateLen(p, geo, b);
  if (p.stats && tid < kNumStats) {
    int64_t v = 0;
    if (tid == kGroupVRows) v = int64_t(t[4]);  // every head of the group
    if (n > 0) {
      switch (tid) {
        case kRows: v = 1; break;
        case kVisible: v = n; break;
        case kKept: v = kept; break;
        case kDenseRows: v = rule.dense; break;
        case kBeyond: v = p.calibrated_max_length > 0 && n > p.calibrated_max_length; break;
      }
    }
    p.stats[(b * p.Hq + h) * kNumStats + tid] = v;
  }
  Stamp(ws.trace_slot, 1, h + p.Hq * b, 4);
}

// Bytes a kernel reads once: an L2 access-policy window marks them streaming (evicted first), so
// that the split kernel's K stream does not push its code, the split records and the kept V rows
// out of L2. (The per-instruction evict-first hint on cp.async faulted: session 20.) H100, harness:
// B = 1 32/8/128 32K 0.0335 -> 0.0329 ms (bench/results/step_h100_session29).
struct Streamed {
  const void* base = nullptr;
  size_t bytes = 0;
};

size_t MaxL2WindowBytes() {
  static const size_t n = [] {
    int dev = 0, v = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&v, cudaDevAttrMaxAccessPolicyWindowSize, dev) != cudaSuccess)
      return size_t(0);
    return size_t(v > 0 ? v : 0);
  }();
  return n;
}

// Launch `kernel` so that it may start while the previous kernel on `stream` finishes (PDL), with
// `streamed` (as much of it as one window holds) marked streaming in L2.
template <typename... Params, typename... Args>
cudaError_t LaunchPdl(Streamed streamed, void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                      Args... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[2];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  const size_t window = streamed.base ? std::min(streamed.bytes, MaxL2WindowBytes()) : 0;
  if (window > 0) {
    attr[1].id = cudaLaunchAttributeAccessPolicyWindow;
    attr[1].val.accessPolicyWindow.base_ptr = const_cast<void*>(streamed.base);
    attr[1].val.accessPolicyWindow.num_bytes = window;
    attr[1].val.accessPolicyWindow.hitRatio = 1.f;
    attr[1].val.accessPolicyWindow.hitProp = cudaAccessPropertyStreaming;
    attr[1].val.accessPolicyWindow.missProp = cudaAccessPropertyStreaming;
    cfg.numAttrs = 2;
  }
  return cudaLaunchKernelEx(&cfg, kernel, args...);
}
template <typename... Params, typename... Args>
cudaError_t LaunchPdl(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream, Args... args) {
  return LaunchPdl(Streamed{}, kernel, grid, block, smem, stream, args...);
}

// -DTOPT_DECODE_FUSED_MERGE=1 (experiment): the pre_softmax split kernel of the 16-bit types merges
// its splits in the last CTA of each (b, g) (MergeTail) when there are at most
// TOPT_CUDA_DECODE_FUSED_MAX_SPLITS (default 8) of them: one launch, no merge kernel. Measured on
// the H100 (bench/results/cuda_kernel.md): no faster than the PDL'd merge kernel, whose launch
// overlaps the split kernel's end, so the default build leaves it out.
#ifndef TOPT_DECODE_FUSED_MERGE
#define TOPT_DECODE_FUSED_MERGE 0
#endif
// A masked call takes the instance that reads the mask, without claims (the dealt tiles are as
// correct, and one instance fewer to build); calls without a mask the lean ones.
template <typename T, int D, int GM>
auto PreSplitKernel(bool fuse, bool claim = false, bool masked = true, bool wide = false) {
  if constexpr (sizeof(T) == 2 && TOPT_DECODE_FUSED_MERGE) {
    if (fuse) return DecodeSplitKernel<T, D, GM, kPre, true>;
  }
  if constexpr (sizeof(T) == 2) {
    if (wide && !masked) return DecodeSplitKernel<T, D, GM, kPre, false, false, false, kWideWarps>;
  }
  if (masked) return DecodeSplitKernel<T, D, GM, kPre, false, false, true>;
  if constexpr (sizeof(T) == 2 && TOPT_DECODE_CLAIM) {
    if (claim) return DecodeSplitKernel<T, D, GM, kPre, false, true, false>;
  }
  return DecodeSplitKernel<T, D, GM, kPre, false, false, false>;
}

int FusedMaxSplits() {
  static const int n = [] {
    const char* s = std::getenv("TOPT_CUDA_DECODE_FUSED_MAX_SPLITS");
    return !TOPT_DECODE_FUSED_MERGE ? 0 : s ? std::atoi(s) : 8;
  }();
  return n;
}

// The split kernels' smem attributes (once per instantiation: they are per device function): the K
// ring as dynamic smem, and the largest smem carve-out, else the driver may pick one that holds
// fewer CTAs than the registers allow.
template <typename T, int D, int GM>
cudaError_t PrepareSplitKernels() {
  constexpr int ring = kStages * KStageBytes<T, D>(), wide_ring = kStages * KStageBytes<T, D, kWideWarps>();
  static cudaError_t status = [] {
    auto prepare = [](auto k, int bytes) {
      cudaError_t e = cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
      if (e == cudaSuccess) e = cudaFuncSetAttribute(k, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared);
      return e;
    };
    for (auto k : {PreSplitKernel<T, D, GM>(false), PreSplitKernel<T, D, GM>(true), PreSplitKernel<T, D, GM>(false, true, false),
                   PreSplitKernel<T, D, GM>(false, false, false), DecodeSplitKernel<T, D, GM, kScores>})
      if (const cudaError_t e = prepare(k, ring); e != cudaSuccess) return e;
    if constexpr (sizeof(T) == 2) return prepare(PreSplitKernel<T, D, GM>(false, false, false, true), wide_ring);
    return cudaSuccess;
  }();
  return status;
}

int SmCount() {
  int dev = 0, sms = 132;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  return sms;
}

// Resident CTAs per SM of the first split kernel of `p`'s placement (the 4-warp instances, or the
// wide one), as the occupancy API reports it.
template <typename T, int D, int GM>
int SplitBlocksPerSm(const TopThetaParams& p, bool wide) {
  if (PrepareSplitKernels<T, D, GM>() != cudaSuccess) return 1;
  int n = 0;
  const cudaError_t e = wide
      ? cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, PreSplitKernel<T, D, GM>(false, false, false, true), kWideWarps * 32,
                                                      kStages * KStageBytes<T, D, kWideWarps>())
      : p.placement == Placement::kPreSoftmax
      ? cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, PreSplitKernel<T, D, GM>(false), kThreads, kStages * KStageBytes<T, D>())
      : cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, DecodeSplitKernel<T, D, GM, kScores>, kThreads, kStages * KStageBytes<T, D>());
  return e == cudaSuccess && n > 0 ? n : 1;
}

bool WideSplits(const TopThetaParams& p);

template <typename T, int D, int GM>
cudaError_t LaunchSplits(const TopThetaParams& p, int splits, const Ws& ws, cudaStream_t stream) {
  const dim3 grid(unsigned(splits), unsigned(p.Hkv), unsigned(p.B));
  constexpr int ring = kStages * KStageBytes<T, D>(), wide_ring = kStages * KStageBytes<T, D, kWideWarps>();
  static_assert(ring >= GM * kMaxSplits * int(sizeof(float)), "the merge tail's scratch lives in the K ring");
  if (const cudaError_t e = PrepareSplitKernels<T, D, GM>(); e != cudaSuccess) return e;
  if (VSumNeeded(p)) {  // before the splits: they and the merge wait for it
    const dim3 vgrid(unsigned(kVSumChunks), unsigned(VSumHeads(p)), unsigned(p.B));
    DecodeVSumKernel<T><<<vgrid, unsigned(std::min<int64_t>(128, (p.Dv + 31) / 32 * 32)), 0, stream>>>(p, ws);
  }
  const bool fuse = p.placement == Placement::kPreSoftmax && sizeof(T) == 2 && splits <= FusedMaxSplits();
  const bool wide = sizeof(T) == 2 && !fuse && WideSplits(p);
  Ws w = ws;
  if (wide) w.split_warps = kWideWarps;
#if TOPT_DECODE_TRACE
  static int launches = 0;
  w.trace_slot = launches++ & 1;
#endif
  // the claiming instance where the longest row the buffer holds would use its claims
  constexpr int64_t kWarpTileRows = Cfg<T, D>::RPW * Cfg<T, D>::U;
  const bool claim = ClaimsPay((Tbuf(p) + kWarpTileRows - 1) / kWarpTileRows, splits);
  const Streamed k_past{p.past_key, p.past_key ? size_t(p.B * p.Hkv * p.P * p.Dh) * sizeof(T) : 0};  // read once
  cudaError_t err = wide
      ? LaunchPdl(k_past, PreSplitKernel<T, D, GM>(false, false, false, true), grid, dim3(kWideWarps * 32), wide_ring, stream, p, w)
      : p.placement == Placement::kPreSoftmax
      ? LaunchPdl(k_past, PreSplitKernel<T, D, GM>(fuse, claim, p.mask_kind != MaskKind::kNone), grid, dim3(kThreads), ring, stream, p, w)
      : LaunchPdl(k_past, DecodeSplitKernel<T, D, GM, kScores>, grid, dim3(kThreads), ring, stream, p, w);
  if (err == cudaSuccess && p.placement != Placement::kPreSoftmax)
    err = LaunchPdl(DecodeSplitKernel<T, D, GM, kPost>, grid, dim3(kThreads), 0, stream, p, w);
  if (err == cudaSuccess) err = cudaGetLastError();
  if (err != cudaSuccess || fuse) return err;
  const dim3 mgrid(unsigned(p.Hq), unsigned(p.B));
  return p.Hq * p.B > 2 * int64_t(SmCount())
      ? LaunchPdl(DecodeMergeKernel<T, 4>, mgrid, dim3(kMergeThreads), 0, stream, p, w, splits)
      : LaunchPdl(DecodeMergeKernel<T, 1>, mgrid, dim3(kMergeThreads), 0, stream, p, w, splits);
}

// Calls f.template operator()<T, D, GM>() for the split-kernel instance that serves p.
template <typename T, int D, typename F>
auto WithInstanceD(const TopThetaParams& p, const F& f) {
  const int64_t G = p.Hq / p.Hkv;
  if (G <= 2) return f.template operator()<T, D, 2>();
  // 3 heads (SmolLM2's 9/3) in their own instance: padded to 4, a quarter of the per-head work
  // would be spent on a head that does not exist. The FFMA path (fp32) needs a power of two.
  if constexpr (sizeof(T) == 2) {
    if (G == 3) return f.template operator()<T, D, 3>();
  }
  if (G <= 4) return f.template operator()<T, D, 4>();
  return f.template operator()<T, D, 8>();
}

template <typename F>
auto WithInstance(const TopThetaParams& p, const F& f) {
  switch (p.dtype) {
    case DType::kFloat16: return p.Dh == 64 ? WithInstanceD<__half, 64>(p, f) : WithInstanceD<__half, 128>(p, f);
    case DType::kBFloat16: return p.Dh == 64 ? WithInstanceD<__nv_bfloat16, 64>(p, f) : WithInstanceD<__nv_bfloat16, 128>(p, f);
    default: return p.Dh == 64 ? WithInstanceD<float, 64>(p, f) : WithInstanceD<float, 128>(p, f);
  }
}

struct LaunchSplitsFn {
  const TopThetaParams& p;
  int splits;
  const Ws& ws;
  cudaStream_t stream;
  template <typename T, int D, int GM>
  cudaError_t operator()() const { return LaunchSplits<T, D, GM>(p, splits, ws, stream); }
};
struct BlocksPerSmFn {
  const TopThetaParams& p;
  bool wide;
  template <typename T, int D, int GM>
  int operator()() const { return SplitBlocksPerSm<T, D, GM>(p, wide); }
};

// The wide instance where the 4-warp grid of one wave would give a (b, g) kWideMinSplits splits or
// more (B = 1); TOPT_CUDA_DECODE_WIDE=0 turns it off (benchmarks: both in one library).
bool WideSplits(const TopThetaParams& p) {
  static const bool allowed = [] {
    const char* s = std::getenv("TOPT_CUDA_DECODE_WIDE");
    return !(s && s[0] == '0');
  }();
  if (!allowed || p.dtype == DType::kFloat32 || p.placement != Placement::kPreSoftmax || p.mask_kind != MaskKind::kNone)
    return false;
  const int64_t slots = int64_t(SmCount()) * WithInstance(p, BlocksPerSmFn{p, false});
  return slots / (p.B * p.Hkv) >= kWideMinSplits;
}

bool Aligned16(const void* x) { return (reinterpret_cast<uintptr_t>(x) & 15u) == 0; }

}  // namespace

bool DecodeSupported(const TopThetaParams& p) {
  const int64_t G = p.Hkv > 0 ? p.Hq / p.Hkv : 0;
  return p.S == 1 && p.Dh == p.Dv && (p.Dh == 64 || p.Dh == 128) && G >= 1 && G <= 8 && p.B > 0 &&
         Aligned16(p.q) && Aligned16(p.k_new) && Aligned16(p.v_new) && Aligned16(p.past_key) &&
         Aligned16(p.past_value) && p.B <= 65535 && p.Hkv <= 65535;
}

int DecodeSplits(const TopThetaParams& p, int forced) {
  if (forced > 0) return std::min(forced, kMaxSplits);
  const int sms = SmCount();
  const int64_t keys = Tbuf(p);
  const int tk = p.dtype == DType::kFloat32 ? (p.Dh == 64 ? 64 : 32) : (p.Dh == 64 ? 128 : 64);
  // One wave: the split kernel holds 3 CTAs per SM (2 for G > 4: registers); more waves leave a
  // partial last wave, fewer leave SMs idle (measured: B=1, 32/8 heads, 32K: 50 splits best).
  // >= 2 tiles of the 4-warp instance each (one of the wide one: capped at 2 wide tiles, 9/3/64 B = 1
  // 8K had 16 splits and no gain, 0.0095 ms; with 32, 0.0091)
  const int64_t max_splits = std::max<int64_t>(1, (keys + 2 * tk - 1) / (2 * tk));
  const int per_sm = WithInstance(p, BlocksPerSmFn{p, WideSplits(p)});
  const int64_t slots = int64_t(sms) * per_sm;
  // TOPT_CUDA_DECODE_WAVES (benchmarks): CTAs per resident slot to aim for, 1 unless set.
  static const double waves = [] {
    const char* s = std::getenv("TOPT_CUDA_DECODE_WAVES");
    const double w = s ? std::atof(s) : 1.0;
    return w > 0.0 ? w : 1.0;
  }();
  const int64_t want = std::max<int64_t>(1, int64_t(waves * double(slots)) / (p.B * p.Hkv));
  return int(std::max<int64_t>(1, std::min<int64_t>({want, max_splits, int64_t(kMaxSplits)})));
}

int64_t DecodeWorkspaceBytes(const TopThetaParams& p, int splits) {
  return (WsFloats(p, splits) * int64_t(sizeof(float)) + 15) / 16 * 16 + CounterBytes(p);
}

int64_t DecodeCounterBytes(const TopThetaParams& p) { return CounterBytes(p); }

cudaError_t LaunchDecode(const TopThetaParams& p, int splits, void* workspace, int64_t workspace_bytes,
                         cudaStream_t stream) {
  const Ws ws = CarveWs(workspace, workspace_bytes, p, splits);
  if (p.dtype != DType::kFloat32 && p.dtype != DType::kFloat16 && p.dtype != DType::kBFloat16) return cudaErrorInvalidValue;
  return WithInstance(p, LaunchSplitsFn{p, splits, ws, stream});
}

}  // namespace cuda_detail
}  // namespace topt

#if TOPT_DECODE_TRACE
// The trace for bench/decode_trace.py (ctypes): copies min(n, all) stamps to `out`.
extern "C" __attribute__((visibility("default"))) int topt_decode_trace(unsigned long long* out, long long n) {
  const size_t bytes = std::min<size_t>(size_t(n) * 8, sizeof(topt::cuda_detail::g_trace));
  return int(cudaMemcpyFromSymbol(out, topt::cuda_detail::g_trace, bytes));
}
#endif
