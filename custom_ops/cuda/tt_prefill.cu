// Prefill (S > 1) TopThetaAttention on tensor cores, float16, Dh = Dv in {64, 128}, no stats, and
// no mask unless every row is dense (dense_prompt: the row's n is not needed); the generic kernel
// serves the rest. One CTA per (64 query rows, head h, batch b), the longest causal rows first;
// each of its 4 warps owns 16 rows and holds their Q in registers. Keys come in tiles of 64
// through a 2-stage cp.async ring; scores are m16n8k16 mma in fp32.
//   pre_softmax: one pass with an online max (as Flash-Attention 2): keep a > θ (every visible key
//                of a dense row); Z over the visible keys and Σ kept e are rescaled as the max grows,
//                so exact SDC's dropped mass is Z − Σ kept e.
//   post_softmax: pass 1, the row max and Z over K alone; pass 2 keeps e/Z > θ.
// The kept e's, rounded to fp16, times V (mma) — skipped for a warp whose 16 rows keep nothing in
// the tile, which each row's tile max decides (the keep rule is monotone in the score), so such a
// tile costs its Q·Kᵀ and, pre-softmax, one exp per score for Z. v̄'s numerator (VMC): the tiles every row of the CTA sees whole add their column sums
// (TileColSumsKernel, once per (b, g) before); the ≤ 2 tiles some rows see in part are read once
// more at the end, as an mma with the 0/1 visibility. Y from RowWeights (tt_common.cuh), as the
// decode kernel.
#include <cuda_fp16.h>

#include "tt_common.cuh"
#include "tt_prefill_rows.cuh"
#include "tt_internal.h"

namespace topt {
namespace cuda_detail {
namespace {

constexpr int kPfRows = 64, kPfWarps = 4, kPfThreads = kPfWarps * 32;

template <int D>
struct PfSmem {
  static constexpr int LD = D + 8;  // halves per row: 16-byte skew, conflict-free ldmatrix
  __half q[kPfRows * LD];
  __half k[2][kPfKeys * LD];
  __half v[2][kPfKeys * LD];
  float vcol[D];
};

__device__ __forceinline__ void LdX4(unsigned (&a)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(a[0]), "=r"(a[1]), "=r"(a[2]), "=r"(a[3]) : "r"(SmemAddr(p)));
}
__device__ __forceinline__ void LdX4T(unsigned (&a)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(a[0]), "=r"(a[1]), "=r"(a[2]), "=r"(a[3]) : "r"(SmemAddr(p)));
}
__device__ __forceinline__ void Mma(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Rows [0, rows) of a [rows, D] half tile into shared memory, 16 bytes a cp.async; row r comes from
// row_ptr(r), or is zero-filled where row_ptr(r) is null.
template <int D, typename RowPtr>
__device__ __forceinline__ void CopyTile(__half* dst, int rows, const __half* any_valid, RowPtr row_ptr) {
  constexpr int C = D / 8, LD = PfSmem<D>::LD;
  const int c = threadIdx.x % C;
  for (int r = threadIdx.x / C; r < rows; r += kPfThreads / C) {
    const __half* src = row_ptr(r);
    CpAsync16(dst + r * LD + c * 8, (src ? src : any_valid) + c * 8, src != nullptr);
  }
}

// S (16 rows of the warp × 64 keys) = Q · Kᵀ, unscaled; Q as A fragments in registers.
template <int D>
__device__ __forceinline__ void TileScores(const __half* k, const unsigned (&qa)[D / 16][4], int lane, float (&s)[8][4]) {
  constexpr int LD = PfSmem<D>::LD;
#pragma unroll
  for (int nt = 0; nt < 8; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) s[nt][e] = 0.f;
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk)
#pragma unroll
    for (int nt = 0; nt < 8; nt += 2) {  // one ldmatrix.x4: the B fragments of key groups nt and nt + 1
      unsigned b[4];
      LdX4(b, k + ((nt + (lane >> 4)) * 8 + (lane & 7)) * LD + kk * 16 + ((lane >> 3) & 1) * 8);
      Mma(s[nt], qa[kk], b[0], b[1]);
      Mma(s[nt + 1], qa[kk], b[2], b[3]);
    }
}

// acc (16 rows × D) += P (16 × 64, as A fragments from the score layout) · V tile.
template <int D>
__device__ __forceinline__ void TilePV(const __half* v, int lane, const unsigned (&pa)[4][4], float (&acc)[D / 8][4]) {
  constexpr int LD = PfSmem<D>::LD;
#pragma unroll
  for (int kc = 0; kc < 4; ++kc)
#pragma unroll
    for (int nd = 0; nd < D / 8; nd += 2) {  // one ldmatrix.x4.trans: dims nd and nd + 1
      unsigned b[4];
      LdX4T(b, v + (kc * 16 + (lane & 15)) * LD + (nd + (lane >> 4)) * 8);
      Mma(acc[nd], pa[kc], b[0], b[1]);
      Mma(acc[nd + 1], pa[kc], b[2], b[3]);
    }
}


template <int D>
constexpr int PfMinBlocks() { return D == 128 ? 2 : 3; }


// Tiles of 64 keys per (b, g) that the column sums cover: every key the buffers can hold.
int64_t ColSumTiles(const TopThetaParams& p) { return (p.total_kv() + kPfKeys - 1) / kPfKeys; }

// Every row dense (n <= k for any n the buffers allow; dense_prompt makes k unbounded): nothing is
// dropped, both placements are exact softmax and v̄ has weight 0.
bool AllRowsDense(const TopThetaParams& p) { return p.k >= p.total_kv(); }

// v̄'s numerator is needed (VMC on a row that may drop keys): the column sums, in the workspace.
bool NeedsColSums(const TopThetaParams& p) { return p.vmc && !AllRowsDense(p); }

// colsum[((b·Hkv + g)·T + t)·D + d] = Σ of V[j][d] over the valid keys j of tile t (fp32).
template <int D>
__global__ void __launch_bounds__(kPfThreads) TileColSumsKernel(TopThetaParams p, float* colsum, int64_t T) {
  constexpr int kCols = D / 2, kGroups = kPfThreads / kCols;  // a half2 column per thread
  __shared__ float2 part[kPfThreads];
  const int64_t t = blockIdx.x, bg = blockIdx.y, b = bg / p.Hkv, g = bg % p.Hkv;
  const KvGeom geo = GetGeom(p, b);
  const int c = threadIdx.x % kCols, grp = threadIdx.x / kCols;
  float2 acc = make_float2(0.f, 0.f);
  for (int r = grp; r < kPfKeys; r += kGroups) {
    const int64_t j = t * kPfKeys + r;
    if (j >= geo.valid_end) break;
    const float2 x = __half22float2(reinterpret_cast<const __half2*>(KvRow<__half>(p.past_value, p.v_new, p, geo, b, g, j, D))[c]);
    acc.x += x.x;
    acc.y += x.y;
  }
  part[threadIdx.x] = acc;
  __syncthreads();
  if (grp != 0) return;
  for (int k = 1; k < kGroups; ++k) acc.x += part[k * kCols + c].x, acc.y += part[k * kCols + c].y;
  reinterpret_cast<float2*>(colsum + (bg * T + t) * D)[c] = acc;
}

// kMasked: read attn_mask (only with every row dense, so never with kPost); its own instance, as
// the mask's code in the score loop slowed the unmasked kernel by 4-10%.
template <int D, bool kPost, bool kMasked>
__global__ void __launch_bounds__(kPfThreads, PfMinBlocks<D>()) PrefillKernel(TopThetaParams p, const float* colsum, int64_t T) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  PfSmem<D>& sm = *reinterpret_cast<PfSmem<D>*>(smem_raw);
  constexpr int LD = PfSmem<D>::LD, ND = D / 8;
  const int64_t q0 = int64_t(gridDim.x - 1 - blockIdx.x) * kPfRows;  // causal: the longest rows start first
  const int64_t h = blockIdx.y, b = blockIdx.z, g = h / (p.Hq / p.Hkv);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const KvGeom geo = GetGeom(p, b);
  const float scale = p.scale;

  // this thread's two rows (r = 0: lane/4, r = 1: lane/4 + 8 of the warp's 16)
  int64_t row[2], end[2];
  RowRule rule[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    row[r] = q0 + warp * 16 + (lane >> 2) + 8 * r;
    end[r] = row[r] < p.S ? RowEnd(p, geo, row[r]) : 0;  // keys [0, end) before the mask: unmasked, n = end
    rule[r] = GetRule(p, h, end[r]);
  }
  const bool warp_live = q0 + warp * 16 < p.S;
  const int64_t warp_see = warp_live ? RowEnd(p, geo, q0 + warp * 16) : 0;  // keys every row of the warp sees
  const int64_t key_end = RowEnd(p, geo, min(p.S, q0 + kPfRows) - 1);      // keys any row of the CTA sees
  const int tiles = int((key_end + kPfKeys - 1) / kPfKeys);
  const int full_tiles = int(RowEnd(p, geo, q0) / kPfKeys);  // tiles [0, full_tiles): every row sees them whole

  const __half* k_any = static_cast<const __half*>(p.k_new) + (b * p.Hkv + g) * p.Skv * D;  // any valid row
  const __half* v_any = static_cast<const __half*>(p.v_new) + (b * p.Hkv + g) * p.Skv * D;
  // Tile t of K or V: its rows run contiguously in the past buffer, then in the new input. A tile
  // wholly in one of them (all but ≤ 2 per row) is one base pointer plus this thread's constant offsets.
  constexpr int kChunks = D / 8, kRowStep = kPfThreads / kChunks;  // 16-byte chunks per row; rows per pass
  const int copy_row = threadIdx.x / kChunks, copy_chunk = threadIdx.x % kChunks;
  const int64_t bg = b * p.Hkv + g;
  auto copy_kv = [&](__half* dst, const void* past, const void* fresh, const __half* any, int t) {
    const int64_t j0 = int64_t(t) * kPfKeys;
    const __half* base = nullptr;
    if (j0 + kPfKeys <= geo.past_rows) base = static_cast<const __half*>(past) + (bg * geo.past_len + j0) * D;
    else if (j0 >= geo.past_rows && j0 + kPfKeys <= geo.valid_end)
      base = static_cast<const __half*>(fresh) + (bg * p.Skv + j0 - geo.past_rows) * D;
    if (base) {
#pragma unroll
      for (int i = 0; i < kPfKeys / kRowStep; ++i) {
        const int r = copy_row + i * kRowStep;
        CpAsync16(dst + r * LD + copy_chunk * 8, base + r * D + copy_chunk * 8, true);
      }
      return;
    }
    const int n_past = int(min(int64_t(kPfKeys), max(int64_t(0), geo.past_rows - j0)));
    const int n_valid = int(min(int64_t(kPfKeys), max(int64_t(0), geo.valid_end - j0)));
    const __half* past_j0 = n_past > 0 ? KvRow<__half>(past, fresh, p, geo, b, g, j0, D) : any;
    const __half* new_j0 = n_valid > n_past ? KvRow<__half>(past, fresh, p, geo, b, g, j0 + n_past, D) - int64_t(n_past) * D : any;
    CopyTile<D>(dst, kPfKeys, any, [&](int r) -> const __half* {
      return r >= n_valid ? nullptr : (r < n_past ? past_j0 : new_j0) + r * D;
    });
  };
  // The 2-stage ring: tile t + 1 is copied while tile t is computed; one barrier per tile.
  auto for_each_tile = [&](bool with_v, auto&& body) {
    auto copy = [&](int t) {
      copy_kv(sm.k[t & 1], p.past_key, p.k_new, k_any, t);
      if (with_v) copy_kv(sm.v[t & 1], p.past_value, p.v_new, v_any, t);
      CpAsyncCommit();
    };
    if (tiles > 0) copy(0);
    for (int t = 0; t < tiles; ++t) {
      CpAsyncWait<0>();
      __syncthreads();  // tile t is in; every warp is done with tile t - 1, whose buffers tile t + 1 takes
      if (t + 1 < tiles) copy(t + 1);
      body(t, sm.k[t & 1], sm.v[t & 1]);
    }
    CpAsyncWait<0>();
    __syncthreads();
  };

  // Q → registers (zeros past S)
  const __half* q_bh = static_cast<const __half*>(p.q) + (b * p.Hq + h) * p.S * D;
  CopyTile<D>(sm.q, kPfRows, q_bh, [&](int r) -> const __half* { return q0 + r < p.S ? q_bh + (q0 + r) * D : nullptr; });
  CpAsyncCommit();
  CpAsyncWait<0>();
  __syncthreads();
  unsigned qa[D / 16][4];
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) LdX4(qa[kk], sm.q + (warp * 16 + (lane & 15)) * LD + kk * 16 + (lane >> 4) * 8);

  // Scores of the warp's 16 rows × the tile, -inf where a row does not see the key: q·k unscaled
  // (scale > 0, so the max and the compare with θ/scale need no multiply), or, with a mask (only
  // for calls whose rows are all dense), a = scale·q·k + the mask's value, so `unit` = 1.
  const float unit = kMasked ? 1.f : scale;  // a = unit · s
  const int64_t mask_base[2] = {kMasked ? MaskBase(p, b, h, row[0]) : 0, kMasked ? MaskBase(p, b, h, row[1]) : 0};
  auto scores = [&](int t, const __half* k, float (&s)[8][4]) {
    TileScores<D>(k, qa, lane, s);
    const int64_t j0 = int64_t(t) * kPfKeys;
    if constexpr (kMasked) {
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int x = 0; x < 4; ++x) {
          const int64_t j = j0 + nt * 8 + 2 * (lane & 3) + (x & 1);
          float add;
          s[nt][x] = j < end[x >> 1] && MaskVisible<__half>(p, mask_base[x >> 1], j, add) ? fmaf(s[nt][x], scale, add) : -INFINITY;
        }
      return;
    }
    if (j0 + kPfKeys <= warp_see) return;  // every row of the warp sees the whole tile
    const int lim[2] = {int(max(int64_t(0), min(int64_t(kPfKeys), end[0] - j0))),
                        int(max(int64_t(0), min(int64_t(kPfKeys), end[1] - j0)))};
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int x = 0; x < 4; ++x)
        if (nt * 8 + 2 * (lane & 3) + (x & 1) >= lim[x >> 1]) s[nt][x] = -INFINITY;
  };
  const float sl2 = unit * kLog2e;  // e = 2^(s·sl2 − max·sl2)
  // the row max of a tile's scores, over the quad that holds the row
  auto tile_max = [&](const float (&s)[8][4], int r) {
    float m = -INFINITY;
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) m = fmaxf(m, fmaxf(s[nt][2 * r], s[nt][2 * r + 1]));
    m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 1));
    return fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 2));
  };

  float mx[2] = {-INFINITY, -INFINITY}, z[2] = {0.f, 0.f};  // mx: the row max of q·k (unscaled); z: this thread's share of Z
  if constexpr (kPost) {  // pass 1: the row max and Z
    for_each_tile(false, [&](int t, const __half* k, const __half*) {
      if (!warp_live) return;
      float s[8][4];
      scores(t, k, s);
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const float nm = fmaxf(mx[r], tile_max(s, r));
        if (nm == -INFINITY) continue;
        float add = 0.f;
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) add += Exp2((s[nt][2 * r] - nm) * sl2) + Exp2((s[nt][2 * r + 1] - nm) * sl2);
        z[r] = z[r] * Exp2((mx[r] - nm) * sl2) + add;  // exp(-inf) = 0 on the first tile
        mx[r] = nm;
      }
    });
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      z[r] += __shfl_xor_sync(0xffffffffu, z[r], 1);
      z[r] += __shfl_xor_sync(0xffffffffu, z[r], 2);
    }
  }
  float inv_z[2], keep_above[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    inv_z[r] = z[r] > 0.f ? 1.f / z[r] : 0.f;
    keep_above[r] = rule[r].dense ? -INFINITY : rule[r].theta / unit;  // pre: a = unit·s > θ
  }

  // the main pass: keep decisions, Σ kept e·V, v̄'s numerator of the whole tiles
  float acc[ND][4];
#pragma unroll
  for (int nd = 0; nd < ND; ++nd)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[nd][e] = 0.f;
  float kept_e[2] = {0.f, 0.f};
  int kept_n[2] = {0, 0};
  for_each_tile(true, [&](int t, const __half* k, const __half* v) {
    if (!warp_live) return;
    float s[8][4];
    scores(t, k, s);
    const float tmax[2] = {tile_max(s, 0), tile_max(s, 1)};
    if constexpr (!kPost) {  // the online max: rescale what was summed against the old one
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const float nm = fmaxf(mx[r], tmax[r]);
        if (nm > mx[r]) {
          const float f = Exp2((mx[r] - nm) * sl2);  // 0 while mx is -inf: nothing summed yet
          z[r] *= f;
          kept_e[r] *= f;
#pragma unroll
          for (int nd = 0; nd < ND; ++nd) acc[nd][2 * r] *= f, acc[nd][2 * r + 1] *= f;
          mx[r] = nm;
        }
      }
    }
    const float mo[2] = {mx[0] == -INFINITY ? 0.f : mx[0] * sl2, mx[1] == -INFINITY ? 0.f : mx[1] * sl2};
    // pre: s > θ/scale (-inf for a dense row: every visible key); s = -inf (not visible) never passes
    auto kept = [&](int r, float a, float e) {
      return kPost ? a != -INFINITY && (rule[r].dense || e * inv_z[r] > rule[r].theta) : a > keep_above[r];
    };
    if constexpr (!kPost)
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int x = 0; x < 4; ++x) z[x >> 1] += Exp2(fmaf(s[nt][x], sl2, -mo[x >> 1]));  // 0 where not visible
    // A row keeps a key of the tile iff it keeps the tile's largest (the rule is monotone in s).
    bool any = false;
#pragma unroll
    for (int r = 0; r < 2; ++r) any |= kept(r, tmax[r], Exp2(fmaf(tmax[r], sl2, -mo[r])));
    if (!__any_sync(0xffffffffu, any)) return;  // no row of the warp keeps a key here: no P·V
    unsigned pa[4][4];
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
      float w[4];
#pragma unroll
      for (int x = 0; x < 4; ++x) {
        const int r = x >> 1;
        const float e = Exp2(fmaf(s[nt][x], sl2, -mo[r]));
        const bool k = kept(r, s[nt][x], e);
        w[x] = k ? e : 0.f;
        kept_e[r] += w[x];
        kept_n[r] += k;
      }
      PackA(pa, nt, w);
    }
    TilePV<D>(v, lane, pa, acc);
  });
  const bool vbar = colsum != nullptr;  // v̄ has weight somewhere (NeedsColSums)
  if (vbar)  // the column sums of the whole tiles
    for (int d = threadIdx.x; d < D; d += kPfThreads) {
      const float* cs = colsum + (b * p.Hkv + g) * T * D + d;
      float sum = 0.f;
#pragma unroll 4
      for (int t = 0; t < min(int64_t(full_tiles), T); ++t) sum += cs[t * D];
      sm.vcol[d] = sum;
    }

  // v̄'s numerator of the tiles some rows see in part: V once more, times the 0/1 visibility
  float vis[ND][4];
#pragma unroll
  for (int nd = 0; nd < ND; ++nd)
#pragma unroll
    for (int e = 0; e < 4; ++e) vis[nd][e] = 0.f;
  if (vbar)
    for (int t = full_tiles; t < tiles; ++t) {
      copy_kv(sm.v[0], p.past_value, p.v_new, v_any, t);
      CpAsyncCommit();
      CpAsyncWait<0>();
      __syncthreads();
      if (warp_live) {
        unsigned va[4][4];
        VisibilityFragments(va, int64_t(t) * kPfKeys, lane, end);
        TilePV<D>(sm.v[0], lane, va, vis);
      }
      __syncthreads();
    }
  __syncthreads();  // vcol complete

  // Y (n = end: a masked call has every row dense, where n only tells an empty row; mx = -inf then too)
  WriteRowsY<D>(p, b, h, lane, row, end, rule, kept_e, kept_n, z, !kPost, false, mx, unit,
                [&](int nd, int r, int e) { return acc[nd][2 * r + e]; },
                [&](int nd, int r, int e) { return vbar ? sm.vcol[nd * 8 + 2 * (lane & 3) + e] + vis[nd][2 * r + e] : 0.f; });
}

template <int D>
cudaError_t LaunchColSums(const TopThetaParams& p, float* colsum, int64_t T, cudaStream_t stream) {
  if (colsum && T > 0) TileColSumsKernel<D><<<dim3(unsigned(T), unsigned(p.B * p.Hkv)), kPfThreads, 0, stream>>>(p, colsum, T);
  return cudaGetLastError();
}

template <int D, bool kPost, bool kMasked>
cudaError_t LaunchPrefillKernel(const TopThetaParams& p, float* colsum, cudaStream_t stream) {
  const int smem = int(sizeof(PfSmem<D>));
  const int64_t T = ColSumTiles(p);
  if (const cudaError_t e = LaunchColSums<D>(p, colsum, T, stream); e != cudaSuccess) return e;
  static bool attr_set = false;
  if (!attr_set) {
    const cudaError_t e = cudaFuncSetAttribute(PrefillKernel<D, kPost, kMasked>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (e != cudaSuccess) return e;
    attr_set = true;
  }
  const dim3 grid(unsigned((p.S + kPfRows - 1) / kPfRows), unsigned(p.Hq), unsigned(p.B));
  PrefillKernel<D, kPost, kMasked><<<grid, kPfThreads, smem, stream>>>(p, colsum, T);
  return cudaGetLastError();
}

template <int D>
cudaError_t LaunchPrefillD(const TopThetaParams& p, float* colsum, cudaStream_t stream) {
  if (p.mask_kind != MaskKind::kNone) return LaunchPrefillKernel<D, false, true>(p, colsum, stream);  // all rows dense
  // all rows dense: post-softmax needs no pass for Z first
  return p.placement == Placement::kPostSoftmax && !AllRowsDense(p) ? LaunchPrefillKernel<D, true, false>(p, colsum, stream)
                                                                    : LaunchPrefillKernel<D, false, false>(p, colsum, stream);
}

bool Aligned16(const void* x) { return (reinterpret_cast<uintptr_t>(x) & 15u) == 0; }

}  // namespace

bool PrefillSupported(const TopThetaParams& p) {
  return p.S > 1 && p.dtype == DType::kFloat16 && p.scale > 0.f && p.Dh == p.Dv && (p.Dh == 64 || p.Dh == 128) &&
         (p.mask_kind == MaskKind::kNone || AllRowsDense(p)) && !p.stats && !p.past_v_sum && p.Hkv > 0 && p.Hq % p.Hkv == 0 &&
         Aligned16(p.q) && Aligned16(p.k_new) && Aligned16(p.v_new) && Aligned16(p.past_key) &&
         Aligned16(p.past_value) && p.B <= 65535 && p.Hq <= 65535 && (p.S + kPfRows - 1) / kPfRows <= 0x7fffffff;
}

namespace {
// The one-pass unmasked instance runs on Hopper warpgroup MMAs where the device allows (H100, 9/3/64
// at 16K, 88% of the 64-row tiles empty: 1.25 ms here, 1.12-1.18 there; θ = -inf: 1.60 and 1.14).
bool UseSm90(const TopThetaParams& p) {
  return p.mask_kind == MaskKind::kNone && (p.placement == Placement::kPreSoftmax || AllRowsDense(p)) && PrefillSm90Available();
}
// The workspace: the column sums, then (UseSm90) K and V staged as its tiles, 256-byte aligned.
int64_t ColSumBytes(const TopThetaParams& p) {
  return NeedsColSums(p) ? (p.B * p.Hkv * ColSumTiles(p) * p.Dv * int64_t(sizeof(float)) + 255) / 256 * 256 : 0;
}
}  // namespace

int64_t PrefillWorkspaceBytes(const TopThetaParams& p) {
  return ColSumBytes(p) + (UseSm90(p) ? PrefillSm90StagedBytes(p, ColSumTiles(p)) : 0);
}

cudaError_t LaunchPrefill(const TopThetaParams& p, void* workspace, cudaStream_t stream) {
  float* colsum = NeedsColSums(p) ? static_cast<float*>(workspace) : nullptr;
  if (UseSm90(p)) {
    const int64_t T = ColSumTiles(p);
    const cudaError_t e = p.Dh == 64 ? LaunchColSums<64>(p, colsum, T, stream) : LaunchColSums<128>(p, colsum, T, stream);
    if (e != cudaSuccess) return e;
    return LaunchPrefillSm90(p, colsum, T, static_cast<char*>(workspace) + ColSumBytes(p), stream);
  }
  return p.Dh == 64 ? LaunchPrefillD<64>(p, colsum, stream) : LaunchPrefillD<128>(p, colsum, stream);
}

}  // namespace cuda_detail
}  // namespace topt
