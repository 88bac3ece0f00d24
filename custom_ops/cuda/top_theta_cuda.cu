// LaunchTopThetaCuda: picks the decode split-KV path (tt_decode.cu), the tiled prefill kernel
// (tt_prefill.cu) or the generic kernel (tt_generic.cu), and writes present_key/value and present_v_sum (tt_kv.cu).
#include "top_theta_cuda.h"

#include "tt_internal.h"

namespace topt {
namespace {

int g_forced_splits = 0;
bool g_disable_decode = false;

bool UseDecode(const TopThetaParams& p) { return !g_disable_decode && cuda_detail::DecodeSupported(p); }
bool UsePrefill(const TopThetaParams& p) { return !g_disable_decode && !UseDecode(p) && cuda_detail::PrefillSupported(p); }

}  // namespace

void SetTopThetaCudaTuning(int decode_splits, bool disable_decode_path) {
  g_forced_splits = decode_splits;
  g_disable_decode = disable_decode_path;
}

int64_t TopThetaCudaWorkspaceBytes(const TopThetaParams& p) {
  if (UsePrefill(p)) return cuda_detail::PrefillWorkspaceBytes(p);
  if (!UseDecode(p)) return 0;
  return cuda_detail::DecodeWorkspaceBytes(p, cuda_detail::DecodeSplits(p, g_forced_splits));
}

int64_t TopThetaCudaWorkspaceZeroTailBytes(const TopThetaParams& p) {
  return UseDecode(p) ? cuda_detail::DecodeCounterBytes(p) : 0;
}

cudaError_t LaunchTopThetaCuda(const TopThetaParams& p, cudaStream_t stream) {
  const bool decode = UseDecode(p);
  cudaError_t err = cuda_detail::LaunchPresentKv(p, /*new_rows=*/!decode, stream);
  if (err != cudaSuccess) return err;
  if (decode) {  // writes Y, stats, present_v_sum and present's new rows
    const int splits = cuda_detail::DecodeSplits(p, g_forced_splits);
    const int64_t bytes = cuda_detail::DecodeWorkspaceBytes(p, splits);
    void* ws = p.workspace;
    int64_t ws_bytes = p.workspace_bytes;
    const bool own = ws == nullptr || p.workspace_bytes < bytes;
    if (own) {  // stream-ordered scratch; its arrival counters (the tail) zeroed
      ws_bytes = bytes;
      if ((err = cudaMallocAsync(&ws, size_t(bytes), stream)) != cudaSuccess) return err;
      const int64_t cb = cuda_detail::DecodeCounterBytes(p);
      if ((err = cudaMemsetAsync(static_cast<char*>(ws) + (bytes - cb) / 16 * 16, 0, size_t(cb), stream)) != cudaSuccess) return err;
    }
    TopThetaParams dp = p;
    dp.after_decode_front = p.after_decode_front && !own;  // a memset ran after the front
    err = cuda_detail::LaunchDecode(dp, splits, ws, ws_bytes, stream);
    if (own) {
      const cudaError_t free_err = cudaFreeAsync(ws, stream);
      if (err == cudaSuccess) err = free_err;
    }
    return err;
  }
  // Not a decode step: the rows this call writes may change sums the state holds.
  if (p.vsum_state_len && (err = cudaMemsetAsync(p.vsum_state_len, 0xff, size_t(2 * p.B) * sizeof(int32_t), stream)) != cudaSuccess)
    return err;
  if (UsePrefill(p)) {  // prompts and chunks: the tiled tensor-core kernel
    const int64_t bytes = cuda_detail::PrefillWorkspaceBytes(p);
    void* ws = p.workspace;
    const bool own = bytes > 0 && (ws == nullptr || p.workspace_bytes < bytes);
    if (own && (err = cudaMallocAsync(&ws, size_t(bytes), stream)) != cudaSuccess) return err;
    err = cuda_detail::LaunchPrefill(p, ws, stream);
    if (own) {
      const cudaError_t free_err = cudaFreeAsync(ws, stream);
      if (err == cudaSuccess) err = free_err;
    }
    if (err != cudaSuccess) return err;
    return cuda_detail::LaunchPresentVSum(p, stream);
  }
  if (p.stats && (err = cudaMemsetAsync(p.stats, 0, size_t(p.B * p.Hq * kNumStats) * sizeof(int64_t), stream)) != cudaSuccess)
    return err;
  if ((err = cuda_detail::LaunchGeneric(p, stream)) != cudaSuccess) return err;
  return cuda_detail::LaunchPresentVSum(p, stream);
}

}  // namespace topt
