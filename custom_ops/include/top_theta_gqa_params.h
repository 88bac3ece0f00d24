// TopThetaGroupQueryAttention's front (docs/op.md, last section): com.microsoft
// GroupQueryAttention's inputs turned into TopThetaAttention's (shared_buffer, causal), and its
// output back. Plain C++: no ONNX Runtime header; the CPU and CUDA implementations take this struct.
#pragma once
#include <cstdint>

#include "top_theta_params.h"

namespace topt {

struct GqaPrepParams {
  DType dtype = DType::kFloat32;
  int64_t B = 0, S = 0, Hq = 0, Hkv = 0, D = 0;

  // Inputs (element pointers of `dtype` unless noted).
  const void* query = nullptr;      // [B, S, Hq·D], or packed [B, S, (Hq + 2·Hkv)·D] (key/value null)
  const void* key = nullptr;        // [B, S, Hkv·D] or null (packed)
  const void* value = nullptr;      // [B, S, Hkv·D] or null (packed)
  const int32_t* seqlens_k = nullptr;     // [B]: total length − 1 per row
  const int64_t* position_ids = nullptr;  // [B, S] or null: past_b + s
  const void* cos_cache = nullptr;  // [max_position, rotary_dim / 2] or null (no rotary)
  const void* sin_cache = nullptr;
  int64_t max_position = 0, rotary_dim = 0;
  bool rotary_interleaved = false;

  // Outputs: TopThetaAttention's Q [B, Hq, S, D], K/V [B, Hkv, S, D] and past_seqlens
  // = max(seqlens_k + 1 − S, 0).
  void* q = nullptr;
  void* k = nullptr;
  void* v = nullptr;
  int32_t* past_seqlens = nullptr;

  bool packed() const { return key == nullptr; }
};

// Y [B, Hq, S, D] → output [B, S, Hq·D] (the same memory when S = 1).
struct GqaOutputParams {
  DType dtype = DType::kFloat32;
  int64_t B = 0, S = 0, Hq = 0, D = 0;
  const void* y = nullptr;
  void* output = nullptr;
};

}  // namespace topt
