// TopThetaGroupQueryAttention's front on the CPU (docs/op.md): GQA inputs → TopThetaAttention's
// Q/K/V/past_seqlens, and Y → GQA's output. Plain C++, no ONNX Runtime header.
#pragma once
#include "top_theta_gqa_params.h"

namespace topt {

// Unpacks, rotates (RoPE at position_ids or past_b + s) and transposes into p.q/k/v; writes
// p.past_seqlens. The caller has checked shapes and that every position is < p.max_position.
void GqaPrepCpu(const GqaPrepParams& p);
// Y [B, Hq, S, D] → output [B, S, Hq·D].
void GqaOutputCpu(const GqaOutputParams& p);

}  // namespace topt
