// Prefill (S > 1) TopThetaAttention on tensor cores, float16, Dh = Dv in {64, 128}, no mask, no
// stats (the generic kernel serves the rest). One CTA per (64 query rows, head h, batch b); each
// of its 4 warps owns 16 rows. Keys come in tiles of 64 through shared memory; scores are
// m16n8k16 mma in fp32.
//   pass 1: per row, the max and Z = Σ exp(a − max) over the visible keys;
//   pass 2: scores again; keep (post_softmax: e/Z > θ; pre_softmax: a > θ; every key of a dense
//           row); the kept e's, rounded to fp16, times V (mma) — skipped for a warp whose rows keep
//           nothing in the tile; v̄'s numerator: whole-CTA column sums of the tiles every row sees,
//           an mma with the 0/1 visibility for the diagonal tiles.
// Y from RowWeights (tt_common.cuh), as the decode kernel.
#include <cuda_fp16.h>

#include "tt_common.cuh"
#include "tt_internal.h"

namespace topt {
namespace cuda_detail {
namespace {

constexpr int kPfRows = 64, kPfKeys = 64, kPfWarps = 4, kPfThreads = kPfWarps * 32;

template <int D>
struct PfSmem {
  static constexpr int LD = D + 8;  // halves per row: 16-byte skew, conflict-free ldmatrix
  __half q[kPfRows * LD];
  __half k[kPfKeys * LD];
  __half v[kPfKeys * LD];
  float vcol[D];
};

__device__ __forceinline__ unsigned SmemAddr(const void* p) { return static_cast<unsigned>(__cvta_generic_to_shared(p)); }
__device__ __forceinline__ void LdX4(unsigned (&a)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(a[0]), "=r"(a[1]), "=r"(a[2]), "=r"(a[3]) : "r"(SmemAddr(p)));
}
__device__ __forceinline__ void LdX2(unsigned (&b)[2], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n" : "=r"(b[0]), "=r"(b[1]) : "r"(SmemAddr(p)));
}
__device__ __forceinline__ void LdX2T(unsigned (&b)[2], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n" : "=r"(b[0]), "=r"(b[1]) : "r"(SmemAddr(p)));
}
__device__ __forceinline__ void Mma(float (&c)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
__device__ __forceinline__ unsigned Pack(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const unsigned*>(&h);
}

// rows [0, n) of a tile from `row(j)` (a pointer to D halves, or null: zeros), 16 bytes a thread.
template <int D, typename RowPtr>
__device__ __forceinline__ void LoadTile(__half* dst, int n, RowPtr row) {
  constexpr int C = D / 8, LD = PfSmem<D>::LD;
  for (int x = threadIdx.x; x < n * C; x += kPfThreads) {
    const int r = x / C, c = x % C;
    const __half* src = row(r);
    const uint4 val = src ? reinterpret_cast<const uint4*>(src)[c] : make_uint4(0, 0, 0, 0);
    *reinterpret_cast<uint4*>(dst + r * LD + c * 8) = val;
  }
}

// S (16 rows of warp w × 64 keys) = Q · Kᵀ for the tile in shared memory, unscaled.
template <int D>
__device__ __forceinline__ void TileScores(const PfSmem<D>& sm, int warp, int lane, float (&s)[8][4]) {
  constexpr int LD = PfSmem<D>::LD;
#pragma unroll
  for (int nt = 0; nt < 8; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) s[nt][e] = 0.f;
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    unsigned a[4];
    LdX4(a, sm.q + (warp * 16 + (lane & 15)) * LD + kk * 16 + (lane >> 4) * 8);
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
      unsigned b[2];
      LdX2(b, sm.k + (nt * 8 + (lane & 7)) * LD + kk * 16 + ((lane >> 3) & 1) * 8);
      Mma(s[nt], a, b);
    }
  }
}

// acc (16 rows × D) += P (16 × 64, as A fragments from the score layout) · V tile.
template <int D>
__device__ __forceinline__ void TilePV(const PfSmem<D>& sm, int lane, const unsigned (&pa)[4][4], float (&acc)[D / 8][4]) {
  constexpr int LD = PfSmem<D>::LD;
#pragma unroll
  for (int kc = 0; kc < 4; ++kc)
#pragma unroll
    for (int nd = 0; nd < D / 8; ++nd) {
      unsigned b[2];
      LdX2T(b, sm.v + (kc * 16 + (lane & 15)) * LD + nd * 8);
      Mma(acc[nd], pa[kc], b);
    }
}

template <int D>
__global__ void __launch_bounds__(kPfThreads) PrefillKernel(TopThetaParams p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  PfSmem<D>& sm = *reinterpret_cast<PfSmem<D>*>(smem_raw);
  const int64_t q0 = int64_t(blockIdx.x) * kPfRows, h = blockIdx.y, b = blockIdx.z;
  const int64_t G = p.Hq / p.Hkv, g = h / G;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const KvGeom geo = GetGeom(p, b);
  const bool post = p.placement == Placement::kPostSoftmax;
  const float scale = p.scale;

  LoadTile<D>(sm.q, kPfRows, [&](int r) -> const __half* {
    const int64_t i = q0 + r;
    return i < p.S ? static_cast<const __half*>(p.q) + ((b * p.Hq + h) * p.S + i) * D : nullptr;
  });
  for (int d = threadIdx.x; d < D; d += kPfThreads) sm.vcol[d] = 0.f;

  // this thread's two rows (r = 0: lane/4, r = 1: lane/4 + 8 of the warp's 16)
  int64_t row[2], end[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    row[r] = q0 + warp * 16 + (lane >> 2) + 8 * r;
    end[r] = row[r] < p.S ? RowEnd(p, geo, row[r]) : 0;  // visible keys [0, end)
  }
  const int64_t last_row = min(p.S, q0 + kPfRows) - 1;
  const int64_t key_end = RowEnd(p, geo, last_row);           // keys any row of the CTA sees
  const int64_t all_see = RowEnd(p, geo, q0);                  // keys every row of the CTA sees
  const int tiles = int((key_end + kPfKeys - 1) / kPfKeys);
  auto key_row = [&](auto* base_past, auto* base_new, int64_t j) -> const __half* {
    return j < geo.valid_end ? KvRow<__half>(base_past, base_new, p, geo, b, g, j, D) : nullptr;
  };

  // pass 1: the row max and Z
  float mx[2] = {-INFINITY, -INFINITY}, z[2] = {0.f, 0.f};
  for (int t = 0; t < tiles; ++t) {
    const int64_t j0 = int64_t(t) * kPfKeys;
    __syncthreads();
    LoadTile<D>(sm.k, kPfKeys, [&](int r) { return key_row(p.past_key, p.k_new, j0 + r); });
    __syncthreads();
    float s[8][4];
    TileScores<D>(sm, warp, lane, s);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float m = -INFINITY;
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int64_t j = j0 + nt * 8 + 2 * (lane & 3) + e;
          if (j < end[r]) m = fmaxf(m, s[nt][2 * r + e] * scale);
        }
      m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 1));
      m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 2));
      const float nm = fmaxf(mx[r], m);
      if (nm == -INFINITY) continue;
      float add = 0.f;
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int64_t j = j0 + nt * 8 + 2 * (lane & 3) + e;
          if (j < end[r]) add += expf(s[nt][2 * r + e] * scale - nm);
        }
      z[r] = z[r] * expf(mx[r] - nm) + add;  // exp(-inf) = 0 on the first tile
      mx[r] = nm;
    }
  }
  RowRule rule[2];
  int64_t n[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    z[r] += __shfl_xor_sync(0xffffffffu, z[r], 1);
    z[r] += __shfl_xor_sync(0xffffffffu, z[r], 2);
    n[r] = end[r];  // no mask: every key before the row end is visible
    rule[r] = GetRule(p, h, n[r]);
  }

  // pass 2: keep decisions, Σ kept e·V, v̄'s numerator
  float acc[D / 8][4], vis[D / 8][4];
#pragma unroll
  for (int nd = 0; nd < D / 8; ++nd)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[nd][e] = vis[nd][e] = 0.f;
  float kept_e[2] = {0.f, 0.f}, dropped_e[2] = {0.f, 0.f};
  int kept_n[2] = {0, 0};
  for (int t = 0; t < tiles; ++t) {
    const int64_t j0 = int64_t(t) * kPfKeys;
    __syncthreads();
    LoadTile<D>(sm.k, kPfKeys, [&](int r) { return key_row(p.past_key, p.k_new, j0 + r); });
    LoadTile<D>(sm.v, kPfKeys, [&](int r) { return key_row(p.past_value, p.v_new, j0 + r); });
    __syncthreads();
    const bool full = j0 + kPfKeys <= all_see;  // every row of the CTA sees the whole tile
    if (full && p.vmc)
      for (int d = threadIdx.x; d < D; d += kPfThreads) {
        float c = 0.f;
#pragma unroll 8
        for (int r = 0; r < kPfKeys; ++r) c += __half2float(sm.v[r * PfSmem<D>::LD + d]);
        sm.vcol[d] += c;  // one thread per column: no race
      }
    float s[8][4];
    TileScores<D>(sm, warp, lane, s);
    unsigned pa[4][4], va[4][4];  // kept e and visibility as A fragments (16 rows × 16 keys each)
    bool any = false;
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
      float w[4], o[4];
#pragma unroll
      for (int x = 0; x < 4; ++x) {
        const int r = x >> 1;
        const int64_t j = j0 + nt * 8 + 2 * (lane & 3) + (x & 1);
        w[x] = o[x] = 0.f;
        if (j < end[r]) {
          const float a = s[nt][x] * scale, e = expf(a - mx[r]);
          const bool keep = rule[r].dense || (post ? e / z[r] > rule[r].theta : a > rule[r].theta);
          o[x] = 1.f;
          if (keep) w[x] = e, kept_e[r] += e, ++kept_n[r], any = true;
          else dropped_e[r] += e;
        }
      }
      const int kc = nt >> 1, half = nt & 1;  // c0,c1 → a0 (a2 for the odd n-tile); c2,c3 → a1 (a3)
      pa[kc][2 * half] = Pack(w[0], w[1]);
      pa[kc][2 * half + 1] = Pack(w[2], w[3]);
      va[kc][2 * half] = Pack(o[0], o[1]);
      va[kc][2 * half + 1] = Pack(o[2], o[3]);
    }
    if (__any_sync(0xffffffffu, any)) TilePV<D>(sm, lane, pa, acc);  // skip: no row of the warp keeps a key here
    if (!full && p.vmc) TilePV<D>(sm, lane, va, vis);
  }
  __syncthreads();

  // Y
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float ke = kept_e[r], de = dropped_e[r];
    int kn = kept_n[r];
#pragma unroll
    for (int o = 1; o <= 2; o <<= 1) {
      ke += __shfl_xor_sync(0xffffffffu, ke, o);
      de += __shfl_xor_sync(0xffffffffu, de, o);
      kn += __shfl_xor_sync(0xffffffffu, kn, o);
    }
    if (row[r] >= p.S) continue;
    const OutWeights ow = RowWeights(p, rule[r], n[r], kn, mx[r], false, z[r], ke, de);
    __half* y = static_cast<__half*>(p.y) + ((b * p.Hq + h) * p.S + row[r]) * D;
#pragma unroll
    for (int nd = 0; nd < D / 8; ++nd)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int d = nd * 8 + 2 * (lane & 3) + e;
        const float vs = p.vmc ? sm.vcol[d] + vis[nd][2 * r + e] : 0.f;
        const float v = ow.zero ? 0.f : ow.wa * acc[nd][2 * r + e] + (ow.wv != 0.f ? ow.wv * vs : 0.f);
        y[d] = __float2half_rn(v);
      }
  }
}

template <int D>
cudaError_t LaunchPrefillD(const TopThetaParams& p, cudaStream_t stream) {
  const int smem = int(sizeof(PfSmem<D>));
  static bool attr_set = false;
  if (!attr_set) {
    const cudaError_t e = cudaFuncSetAttribute(PrefillKernel<D>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (e != cudaSuccess) return e;
    attr_set = true;
  }
  const dim3 grid(unsigned((p.S + kPfRows - 1) / kPfRows), unsigned(p.Hq), unsigned(p.B));
  PrefillKernel<D><<<grid, kPfThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

bool Aligned16(const void* x) { return (reinterpret_cast<uintptr_t>(x) & 15u) == 0; }

}  // namespace

bool PrefillSupported(const TopThetaParams& p) {
  return p.S > 1 && p.dtype == DType::kFloat16 && p.Dh == p.Dv && (p.Dh == 64 || p.Dh == 128) &&
         p.mask_kind == MaskKind::kNone && !p.stats && !p.past_v_sum && p.Hkv > 0 && p.Hq % p.Hkv == 0 &&
         Aligned16(p.q) && Aligned16(p.k_new) && Aligned16(p.v_new) && Aligned16(p.past_key) &&
         Aligned16(p.past_value) && p.B <= 65535 && p.Hq <= 65535 && (p.S + kPfRows - 1) / kPfRows <= 0x7fffffff;
}

cudaError_t LaunchPrefill(const TopThetaParams& p, cudaStream_t stream) {
  return p.Dh == 64 ? LaunchPrefillD<64>(p, stream) : LaunchPrefillD<128>(p, stream);
}

}  // namespace cuda_detail
}  // namespace topt
