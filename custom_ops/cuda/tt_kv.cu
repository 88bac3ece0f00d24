// present_key / present_value / present_v_sum (op.md, KV layouts and present_v_sum).
#include "tt_common.cuh"
#include "tt_internal.h"

namespace topt {
namespace cuda_detail {
namespace {

// The S new rows of (b, g) into present at their position (concat: P; shared_buffer: p_b).
// grid (Skv, Hkv, B); K and V rows, 16-bit or 32-bit elements copied as raw bits.
template <typename E>
__global__ void WriteNewRowsKernel(TopThetaParams p) {
  const int64_t s = blockIdx.x, g = blockIdx.y, b = blockIdx.z;
  const KvGeom geo = GetGeom(p, b);
  const int64_t rows = p.kv_layout == KvLayout::kSharedBuffer ? p.P : p.P + p.Skv;  // present rows
  const int64_t bg = b * p.Hkv + g, dst_row = bg * rows + geo.past_rows + s, src_row = bg * p.Skv + s;
  if (p.present_key) {
    const E* src = static_cast<const E*>(p.k_new) + src_row * p.Dh;
    E* dst = static_cast<E*>(p.present_key) + dst_row * p.Dh;
    for (int64_t d = threadIdx.x; d < p.Dh; d += blockDim.x) dst[d] = src[d];
  }
  if (p.present_value) {
    const E* src = static_cast<const E*>(p.v_new) + src_row * p.Dv;
    E* dst = static_cast<E*>(p.present_value) + dst_row * p.Dv;
    for (int64_t d = threadIdx.x; d < p.Dv; d += blockDim.x) dst[d] = src[d];
  }
}

// present_v_sum[b, g, :] = base + Σ rows visible to the last query row of head g·G, where base is
// past_v_sum (then only new rows are summed) or 0 (then past rows are read too).
// grid (Hkv, B), threads over Dv.
template <typename T>
__global__ void PresentVSumKernel(TopThetaParams p) {
  const int64_t g = blockIdx.x, b = blockIdx.y, G = p.Hq / p.Hkv, h = g * G;
  const KvGeom geo = GetGeom(p, b);
  const int64_t i = p.S - 1;
  const int64_t end = p.S > 0 ? RowEnd(p, geo, i) : geo.past_rows;
  const int64_t begin = p.past_v_sum ? geo.past_rows : 0;
  const int64_t mbase = p.S > 0 ? MaskBase(p, b, h, i) : 0;
  for (int64_t d = threadIdx.x; d < p.Dv; d += blockDim.x) {
    float sum = p.past_v_sum ? p.past_v_sum[(b * p.Hkv + g) * p.Dv + d] : 0.f;
    for (int64_t j = begin; j < end; ++j) {
      float add;
      if (p.S > 0 && !MaskVisible<T>(p, mbase, j, add)) continue;
      sum += ToF<T>(KvRow<T>(p.past_value, p.v_new, p, geo, b, g, j, p.Dv)[d]);
    }
    p.present_v_sum[(b * p.Hkv + g) * p.Dv + d] = sum;
  }
}

size_t ElemSize(DType t) { return t == DType::kFloat32 ? 4 : 2; }

}  // namespace

cudaError_t LaunchPresentKv(const TopThetaParams& p, bool new_rows, cudaStream_t stream) {
  if (!p.present_key && !p.present_value) return cudaSuccess;
  const size_t es = ElemSize(p.dtype);
  const size_t bh = size_t(p.B * p.Hkv);
  struct Part { void* present; const void* past; int64_t d; };
  const Part parts[2] = {{p.present_key, p.past_key, p.Dh}, {p.present_value, p.past_value, p.Dv}};
  for (const Part& part : parts) {
    if (!part.present || !part.past || p.P == 0) continue;
    const size_t past_bytes = size_t(p.P * part.d) * es;
    cudaError_t err = cudaSuccess;
    if (p.kv_layout == KvLayout::kConcat) {  // [B·Hkv, P·d] into rows of (P+Skv)·d
      err = cudaMemcpy2DAsync(part.present, size_t((p.P + p.Skv) * part.d) * es, part.past, past_bytes,
                              past_bytes, bh, cudaMemcpyDeviceToDevice, stream);
    } else if (part.present != part.past) {  // shared_buffer not bound in place: copy the buffer
      err = cudaMemcpyAsync(part.present, part.past, past_bytes * bh, cudaMemcpyDeviceToDevice, stream);
    }
    if (err != cudaSuccess) return err;
  }
  if (new_rows && p.Skv > 0 && p.B > 0 && p.Hkv > 0) {
    const dim3 grid(unsigned(p.Skv), unsigned(p.Hkv), unsigned(p.B));
    if (es == 4) WriteNewRowsKernel<uint32_t><<<grid, 128, 0, stream>>>(p);
    else WriteNewRowsKernel<uint16_t><<<grid, 128, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

cudaError_t LaunchPresentVSum(const TopThetaParams& p, cudaStream_t stream) {
  if (!p.present_v_sum || p.B == 0 || p.Hkv == 0) return cudaSuccess;
  const dim3 grid(unsigned(p.Hkv), unsigned(p.B));
  switch (p.dtype) {
    case DType::kFloat32: PresentVSumKernel<float><<<grid, 128, 0, stream>>>(p); break;
    case DType::kFloat16: PresentVSumKernel<__half><<<grid, 128, 0, stream>>>(p); break;
    case DType::kBFloat16: PresentVSumKernel<__nv_bfloat16><<<grid, 128, 0, stream>>>(p); break;
  }
  return cudaGetLastError();
}

}  // namespace cuda_detail
}  // namespace topt
