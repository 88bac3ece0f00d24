// TopThetaGroupQueryAttention's front on CUDA (docs/op.md): one kernel turns GQA's inputs into
// TopThetaAttention's Q/K/V [B, H, S, D] (unpack, RoPE, transpose) and past_seqlens; for S > 1 a
// second one transposes Y back to [B, S, Hq·D] (for S = 1 the two layouts are the same memory).
#include "tt_common.cuh"
#include "top_theta_cuda.h"

namespace topt {
namespace cuda_detail {
namespace {

// grid (Hq + 2·Hkv, S, B); one thread per pair of rotated elements (D / 2 threads).
template <typename T>
__global__ void GqaPrepKernel(GqaPrepParams p) {
  LaunchDependents();  // the decode split kernel (PDL) may take its SM slots now; it waits for this grid's end
  const int64_t h = blockIdx.x, s = blockIdx.y, b = blockIdx.z, S = p.S, D = p.D;
  const int64_t heads = p.Hq + 2 * p.Hkv, half = p.rotary_dim / 2;
  const int32_t past = max(p.seqlens_k[b] + 1 - int32_t(S), 0);
  if (h == 0 && s == 0 && threadIdx.x == 0) p.past_seqlens[b] = past;
  const bool is_q = h < p.Hq, is_k = !is_q && h < p.Hq + p.Hkv;
  const T* src;
  if (p.key == nullptr) src = static_cast<const T*>(p.query) + ((b * S + s) * heads + h) * D;
  else if (is_q) src = static_cast<const T*>(p.query) + ((b * S + s) * p.Hq + h) * D;
  else src = static_cast<const T*>(is_k ? p.key : p.value) + ((b * S + s) * p.Hkv + (h - p.Hq - (is_k ? 0 : p.Hkv))) * D;
  T* dst;
  if (is_q) dst = static_cast<T*>(p.q) + ((b * p.Hq + h) * S + s) * D;
  else if (is_k) dst = static_cast<T*>(p.k) + ((b * p.Hkv + (h - p.Hq)) * S + s) * D;
  else dst = static_cast<T*>(p.v) + ((b * p.Hkv + (h - p.Hq - p.Hkv)) * S + s) * D;
  const bool rotate = p.cos_cache != nullptr && h < p.Hq + p.Hkv;
  int64_t pos = p.position_ids ? p.position_ids[b * S + s] : past + s;
  pos = min(max(pos, int64_t(0)), p.max_position - 1);  // the glue checks host positions; never read out of the cache
  for (int64_t t = threadIdx.x; t < D / 2; t += blockDim.x) {
    // pair t: (t, t + half) or (2t, 2t + 1) inside the rotary dims; two plain elements past them
    if (rotate && t < half) {
      const int64_t i0 = p.rotary_interleaved ? 2 * t : t, i1 = p.rotary_interleaved ? 2 * t + 1 : t + half;
      const float c = ToF<T>(static_cast<const T*>(p.cos_cache)[pos * half + t]);
      const float sn = ToF<T>(static_cast<const T*>(p.sin_cache)[pos * half + t]);
      const float x0 = ToF<T>(src[i0]), x1 = ToF<T>(src[i1]);
      dst[i0] = FromF<T>(x0 * c - x1 * sn);
      dst[i1] = FromF<T>(x1 * c + x0 * sn);
    } else {  // plain pairs: every pair without rotary, or those past the rotary dims (2t >= rotary_dim)
      dst[2 * t] = src[2 * t];
      dst[2 * t + 1] = src[2 * t + 1];
    }
  }
}

// grid (Hq, S, B): Y [B, Hq, S, D] → output [B, S, Hq, D].
template <typename T>
__global__ void GqaOutputKernel(GqaOutputParams p) {
  const int64_t h = blockIdx.x, s = blockIdx.y, b = blockIdx.z;
  const T* y = static_cast<const T*>(p.y) + ((b * p.Hq + h) * p.S + s) * p.D;
  T* out = static_cast<T*>(p.output) + ((b * p.S + s) * p.Hq + h) * p.D;
  for (int64_t d = threadIdx.x; d < p.D; d += blockDim.x) out[d] = y[d];
}

unsigned Threads(int64_t n) { return unsigned(std::min<int64_t>(256, std::max<int64_t>(32, (n + 31) / 32 * 32))); }

}  // namespace
}  // namespace cuda_detail

cudaError_t LaunchGqaPrep(const GqaPrepParams& p, cudaStream_t stream) {
  using namespace cuda_detail;
  const dim3 grid(unsigned(p.Hq + 2 * p.Hkv), unsigned(p.S), unsigned(p.B));
  switch (p.dtype) {
    case DType::kFloat32: GqaPrepKernel<float><<<grid, Threads(p.D / 2), 0, stream>>>(p); break;
    case DType::kFloat16: GqaPrepKernel<__half><<<grid, Threads(p.D / 2), 0, stream>>>(p); break;
    case DType::kBFloat16: GqaPrepKernel<__nv_bfloat16><<<grid, Threads(p.D / 2), 0, stream>>>(p); break;
  }
  return cudaGetLastError();
}

cudaError_t LaunchGqaOutput(const GqaOutputParams& p, cudaStream_t stream) {
  using namespace cuda_detail;
  const dim3 grid(unsigned(p.Hq), unsigned(p.S), unsigned(p.B));
  switch (p.dtype) {
    case DType::kFloat32: GqaOutputKernel<float><<<grid, Threads(p.D), 0, stream>>>(p); break;
    case DType::kFloat16: GqaOutputKernel<__half><<<grid, Threads(p.D), 0, stream>>>(p); break;
    case DType::kBFloat16: GqaOutputKernel<__nv_bfloat16><<<grid, Threads(p.D), 0, stream>>>(p); break;
  }
  return cudaGetLastError();
}

}  // namespace topt
