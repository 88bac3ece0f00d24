// Per-row pieces the two prefill kernels (tt_prefill.cu, tt_prefill_sm90.cu) share. Both hold a
// warp's 16 rows in the m16n8 fragment layout: this thread's rows r = lane/4 + 8r (r = 0, 1), dims
// nd·8 + 2·(lane % 4) + e (e = 0, 1), the quad of lanes 4i..4i+3 holding a row.
#pragma once
#include <cuda_fp16.h>

#include "tt_common.cuh"

namespace topt {
namespace cuda_detail {

// A fragments of the 0/1 visibility of the 64 keys from j0 for this thread's rows (keys < end[r]).
__device__ __forceinline__ void VisibilityFragments(unsigned (&va)[4][4], int64_t j0, int lane, const int64_t (&end)[2]) {
#pragma unroll
  for (int nt = 0; nt < 8; ++nt) {
    float o[4];
#pragma unroll
    for (int x = 0; x < 4; ++x) o[x] = j0 + nt * 8 + 2 * (lane & 3) + (x & 1) < end[x >> 1] ? 1.f : 0.f;
    PackA(va, nt, o);
  }
}

// Y of this thread's two rows: the quad's kept sums (and Z where each thread holds a share:
// z_shared), RowWeights, then Y = wa·acc + wv·v̄'s numerator. all_kept: every visible key was kept
// and the loop summed nothing into kept_e, kept_n (they are Z and n). mx·unit is the reference
// the e's were taken against. acc_at(nd, r, e) and vsum_at(nd, r, e) give O's and v̄'s numerator's
// element (the latter read only where wv ≠ 0).
template <int D, typename AccAt, typename VsumAt>
__device__ __forceinline__ void WriteRowsY(const TopThetaParams& p, int64_t b, int64_t h, int lane, const int64_t (&row)[2],
                                           const int64_t (&end)[2], const RowRule (&rule)[2], const float (&kept_e)[2],
                                           const int (&kept_n)[2], const float (&z)[2], bool z_shared, bool all_kept,
                                           const float (&mx)[2], float unit, AccAt acc_at, VsumAt vsum_at) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float ke = kept_e[r], zz = z[r];
    int kn = kept_n[r];
#pragma unroll
    for (int o = 1; o <= 2; o <<= 1) {
      ke += __shfl_xor_sync(0xffffffffu, ke, o);
      kn += __shfl_xor_sync(0xffffffffu, kn, o);
      if (z_shared) zz += __shfl_xor_sync(0xffffffffu, zz, o);
    }
    if (row[r] >= p.S) continue;
    if (all_kept) ke = zz, kn = int(end[r]);
    const OutWeights ow = RowWeights(p, rule[r], end[r], kn, mx[r] * unit, false, zz, ke, fmaxf(zz - ke, 0.f));
    __half* y = static_cast<__half*>(p.y) + ((b * p.Hq + h) * p.S + row[r]) * D;
#pragma unroll
    for (int nd = 0; nd < D / 8; ++nd) {
      float out[2];
#pragma unroll
      for (int e = 0; e < 2; ++e) out[e] = ow.zero ? 0.f : ow.wa * acc_at(nd, r, e) + (ow.wv != 0.f ? ow.wv * vsum_at(nd, r, e) : 0.f);
      *reinterpret_cast<__half2*>(y + nd * 8 + 2 * (lane & 3)) = __floats2half2_rn(out[0], out[1]);
    }
  }
}

}  // namespace cuda_detail
}  // namespace topt
