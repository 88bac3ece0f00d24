// The one parameter struct every TopThetaAttention kernel (CPU, CUDA) takes.
// Plain C++: no ONNX Runtime header. The ORT glue fills it; docs/op.md is the contract.
#pragma once
#include <cstdint>

namespace topt {

enum class Placement : int32_t { kPostSoftmax = 0, kPreSoftmax = 1 };
enum class Sdc : int32_t { kNone = 0, kExact = 1, kExpThreshold = 2, kCalibrated = 3 };
enum class KvLayout : int32_t { kConcat = 0, kSharedBuffer = 1 };
enum class MaskKind : int32_t { kNone = 0, kBool = 1, kFloat = 2 };
enum class DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Tensors are dense row-major. Element pointers are `const void*` of `dtype` (T in op.md);
// thresholds, v sums and statistics have fixed types.
struct TopThetaParams {
  DType dtype = DType::kFloat32;

  // Sizes (op.md letters).
  int64_t B = 0, Hq = 0, Hkv = 0, S = 0, Skv = 0, Dh = 0, Dv = 0;
  int64_t P = 0;     // concat: past length; shared_buffer: buffer length M
  int64_t L = 0;     // calibrated lengths

  // Attributes.
  float scale = 0.f;
  bool is_causal = false;
  int64_t k = 0;
  Placement placement = Placement::kPostSoftmax;
  Sdc sdc = Sdc::kNone;
  bool vmc = true;
  KvLayout kv_layout = KvLayout::kConcat;
  int64_t calibrated_max_length = 0;

  // Inputs.
  const void* q = nullptr;           // [B, Hq, S, Dh]
  const void* k_new = nullptr;       // [B, Hkv, Skv, Dh]
  const void* v_new = nullptr;       // [B, Hkv, Skv, Dv]
  const void* past_key = nullptr;    // [B, Hkv, P, Dh] or null (concat only)
  const void* past_value = nullptr;  // [B, Hkv, P, Dv] or null
  const int32_t* past_seqlens = nullptr;  // [B], shared_buffer only
  const float* thresholds = nullptr;      // [Hq, L]
  const int64_t* threshold_lengths = nullptr;  // [L]
  const float* past_v_sum = nullptr;      // [B, Hkv, Dv] or null
  const float* sdc_log_mass = nullptr;    // [Hq, L] or null

  // Mask: bool (uint8) or T, broadcast to [B, Hq, S, Ttot] through element strides
  // (a stride of 0 on a broadcast axis).
  MaskKind mask_kind = MaskKind::kNone;
  const void* mask = nullptr;
  int64_t mask_stride_b = 0, mask_stride_h = 0, mask_stride_s = 0, mask_stride_t = 0;

  // Outputs (null when not requested, except y).
  void* y = nullptr;                 // [B, Hq, S, Dv]
  void* present_key = nullptr;       // concat: [B, Hkv, P+Skv, Dh]; shared_buffer: [B, Hkv, P, Dh]
  void* present_value = nullptr;
  float* present_v_sum = nullptr;    // [B, Hkv, Dv]
  int64_t* stats = nullptr;          // [B, Hq, 6]

  // Running V sum of an in-place `shared_buffer` cache, kept between calls by the CUDA glue (so a
  // compiled model needs no past_v_sum I/O and VMC does not stream V every step). Two slots by
  // length parity: slot s holds the sum of rows [0, n) of (b, g) iff vsum_state_len[s·B + b] == n,
  // n % 2 == s. A decode call (S = 1) at past p reads slot p % 2 (else sums V's rows itself) and
  // writes slot (p + 1) % 2; any other call marks both slots invalid. Null: no state (CPU kernel).
  float* vsum_state = nullptr;        // [2, B, Hkv, Dv], device
  int32_t* vsum_state_len = nullptr;  // [2, B], device

  // Device scratch for the CUDA kernel (topt::TopThetaCudaWorkspaceBytes(p) bytes); null: the
  // kernel allocates stream-ordered scratch itself. Unused by the CPU kernel.
  void* workspace = nullptr;
  int64_t workspace_bytes = 0;

  // Set by the CUDA glue when the kernel right before on the stream is the GQA decode front
  // (TopThetaGroupQueryAttention, S = 1), launched normally: it writes q, k_new, v_new only, so the
  // decode split kernel may read what else it needs (past K, past_seqlens) before its PDL wait.
  bool after_decode_front = false;

  int64_t total_kv() const { return kv_layout == KvLayout::kConcat ? P + Skv : P; }
  int64_t group_size() const { return Hq / Hkv; }
};

// TopThetaCalibrate (op.md, last section): exact top-k attention plus the sums thresholds are
// computed from. `attention` is filled as for TopThetaAttention with thresholds and sdc_log_mass
// null, kv_layout concat, calibrated_max_length 0 and sdc_calibrated read as sdc_exact.
struct TopThetaCalibrateParams {
  TopThetaParams attention;
  double* theta_sums = nullptr;  // [Hq, L, 3] or null: (rows, Σ θ_row, Σ θ_row²)
  double* sdc_sums = nullptr;    // [Hq, L, 2] or null: (rows, log Σ exp(ℓ_row))
};

// Index of the stats columns (op.md, `stats`).
enum StatsColumn : int { kRows = 0, kVisible = 1, kKept = 2, kDenseRows = 3, kBeyond = 4, kGroupVRows = 5, kNumStats = 6 };

}  // namespace topt
