// Host-side entry points of the CUDA kernel files, called by the launcher (top_theta_cuda.cu).
#pragma once
#include <cstdint>

#include <cuda_runtime.h>

#include "../include/top_theta_params.h"

namespace topt {
namespace cuda_detail {

// tt_kv.cu: present_key/value (concat: past ⧺ new; shared_buffer: copy if not in place, then the
// S new rows at past_seqlens[b]) and present_v_sum.
// new_rows = false: only the past copy (the decode merge kernel writes the new rows).
cudaError_t LaunchPresentKv(const TopThetaParams& p, bool new_rows, cudaStream_t stream);
cudaError_t LaunchPresentVSum(const TopThetaParams& p, cudaStream_t stream);

// tt_generic.cu: any S, head dims, mask, group size; one CTA per (b, kv head, query row).
// Adds into stats (the caller zeroes it first).
cudaError_t LaunchGeneric(const TopThetaParams& p, cudaStream_t stream);

// tt_prefill.cu: S > 1, float16, Dh = Dv in {64, 128}, no mask unless every row is dense, no
// stats, no past_v_sum, 16-byte aligned rows; tensor-core tiles of 64 rows × 64 keys. Writes Y
// only. Workspace (VMC: V's column sums per 64-key tile): PrefillWorkspaceBytes.
bool PrefillSupported(const TopThetaParams& p);
int64_t PrefillWorkspaceBytes(const TopThetaParams& p);
cudaError_t LaunchPrefill(const TopThetaParams& p, void* workspace, cudaStream_t stream);

// tt_prefill_sm90.cu: tt_prefill.cu's one-pass instance on Hopper warpgroup MMAs (128 rows × 64-key
// tiles), launched by LaunchPrefill where PrefillSm90Available(); staged: PrefillSm90StagedBytes of
// workspace (16-byte aligned) for K and V staged as the kernel's tiles; colsum and T as
// tt_prefill.cu's column sums.
bool PrefillSm90Available();
int64_t PrefillSm90StagedBytes(const TopThetaParams& p, int64_t T);
cudaError_t LaunchPrefillSm90(const TopThetaParams& p, const float* colsum, int64_t T, void* staged, cudaStream_t stream);

// tt_decode.cu: S = 1, Dh = Dv in {64, 128}, G <= 8, 16-byte aligned rows; split-KV, then the
// merge kernel (or, with -DTOPT_DECODE_FUSED_MERGE=1, the last CTA of each (b, g) merging).
// Writes Y, stats, present_v_sum and the new rows of present_key/value itself.
// Workspace: DecodeWorkspaceBytes; its last DecodeCounterBytes (arrival counters) must be zero at
// launch and are zero again when the launch completes.
bool DecodeSupported(const TopThetaParams& p);
int DecodeSplits(const TopThetaParams& p, int forced);
int64_t DecodeWorkspaceBytes(const TopThetaParams& p, int splits);
int64_t DecodeCounterBytes(const TopThetaParams& p);
cudaError_t LaunchDecode(const TopThetaParams& p, int splits, void* workspace, int64_t workspace_bytes,
                         cudaStream_t stream);

}  // namespace cuda_detail
}  // namespace topt
