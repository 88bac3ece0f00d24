// TopThetaAttention on CUDA (docs/op.md): the launcher. No ONNX Runtime header.
#pragma once
#include <cstdint>

#include <cuda_runtime.h>

#include "../include/top_theta_gqa_params.h"
#include "../include/top_theta_params.h"

namespace topt {

// Runs the op on `stream` for p.dtype float32, float16 or bfloat16. The caller has validated
// shapes and values; pointers are device pointers (16-byte aligned rows take the fast paths).
// Scratch: p.workspace if it holds TopThetaCudaWorkspaceBytes(p) bytes, else stream-ordered
// cudaMallocAsync/cudaFreeAsync. A caller's workspace must hold zeros in its last
// TopThetaCudaWorkspaceZeroTailBytes(p) bytes (rounded to 16 from the end of p.workspace_bytes:
// the decode path's arrival counters) at launch; the launch leaves them zero again (so a
// workspace zeroed once serves every later call and CUDA-graph replay on one stream).
// Returns the first CUDA error (launch errors included).
cudaError_t LaunchTopThetaCuda(const TopThetaParams& p, cudaStream_t stream);

// Bytes of scratch LaunchTopThetaCuda needs for `p` on the current device (0 if none).
int64_t TopThetaCudaWorkspaceBytes(const TopThetaParams& p);
// Bytes at the end of the workspace that must be zero at launch (see above; 0 if none).
int64_t TopThetaCudaWorkspaceZeroTailBytes(const TopThetaParams& p);

// TopThetaGroupQueryAttention's front (top_theta_gqa_params.h): GQA inputs → the op's Q/K/V and
// past_seqlens (positions are clamped into the cos/sin cache: the caller checks them), and Y back.
cudaError_t LaunchGqaPrep(const GqaPrepParams& p, cudaStream_t stream);
cudaError_t LaunchGqaOutput(const GqaOutputParams& p, cudaStream_t stream);

// Benchmark/test hooks: force the KV-split count of the decode path (0: automatic) and
// disable the decode and prefill fast paths (every call then takes the generic kernel).
void SetTopThetaCudaTuning(int decode_splits, bool disable_decode_path);

}  // namespace topt
