// TopThetaGroupQueryAttention (docs/op.md, last section): a drop-in for com.microsoft
// GroupQueryAttention — the same inputs, attributes and outputs plus the θ tables — so a compiled
// model runs one node where the dense one ran one. The front (unpack, RoPE, transpose: GqaPrep*)
// feeds TopThetaAttention's kernels (shared_buffer, causal). CPU op here; the CUDA one in
// top_theta_cuda_op.h.
#pragma once
#include "top_theta_gqa_params.h"
#include "top_theta_ort.h"

namespace topt::ort {

inline constexpr const char* kGqaOpName = "TopThetaGroupQueryAttention";

enum GqaInputIndex : size_t {
  kGqaQuery, kGqaKey, kGqaValue, kGqaPastKey, kGqaPastValue, kGqaSeqlensK, kGqaTotalSequenceLength,
  kGqaCosCache, kGqaSinCache, kGqaPositionIds, kGqaThresholds, kGqaThresholdLengths, kGqaPastVSum,
  kGqaSdcLogMass, kGqaNumInputs
};
extern const char* const kGqaInputNames[kGqaNumInputs];

ONNXTensorElementDataType GqaInputType(size_t index, ONNXTensorElementDataType t);
OrtCustomOpInputOutputCharacteristic GqaInputCharacteristic(size_t index);

struct GqaAttributes {
  Attributes base;  // is_causal = 1, kv_layout = shared_buffer
  int64_t num_heads = 0, kv_num_heads = 0;
  bool do_rotary = false, rotary_interleaved = false;
};
GqaAttributes ParseGqaAttributes(const OrtKernelInfo* info);

// One call: the attention params (Q/K/V/past_seqlens/Y point into the scratch once placed), the
// front's params and the scratch it needs.
struct GqaCall {
  TopThetaParams p;
  GqaPrepParams prep;
  GqaOutputParams out;  // used when S > 1 (S = 1: Y is the output itself)
  int64_t scratch_bytes = 0;
};
// Validates the inputs (on the host too when `values_on_host`: seqlens_k and position_ids
// ranges), allocates the outputs.
GqaCall GqaCallFromContext(OrtKernelContext* context, const GqaAttributes& a, bool values_on_host);
// Points the call's intermediate tensors into `scratch` (scratch_bytes, 256-byte aligned pieces).
void PlaceGqaScratch(GqaCall& call, void* scratch);

struct GqaSignature {
  static constexpr const char* kName = kGqaOpName;
  static constexpr size_t kInputs = kGqaNumInputs, kOutputs = kNumOutputs;
  static ONNXTensorElementDataType InputType(size_t i, ONNXTensorElementDataType t) { return GqaInputType(i, t); }
  static ONNXTensorElementDataType OutputType(size_t i, ONNXTensorElementDataType t) { return ort::OutputType(i, t); }
  static OrtCustomOpInputOutputCharacteristic InputCharacteristic(size_t i) { return GqaInputCharacteristic(i); }
  static OrtCustomOpInputOutputCharacteristic OutputCharacteristic(size_t i) { return ort::OutputCharacteristic(i); }
  // total_sequence_length is never read (seqlens_k gives every row's length): host memory, as
  // GroupQueryAttention declares it, so the genai graph's CPU Shape→Gather feeds it without a copy.
  static OrtMemType InputMemoryType(size_t i) { return i == kGqaTotalSequenceLength ? OrtMemTypeCPUInput : OrtMemTypeDefault; }
};

struct TopThetaGqaCpuKernel {
  GqaAttributes attributes;
  static TopThetaGqaCpuKernel* Create(const OrtKernelInfo* info) { return new TopThetaGqaCpuKernel{ParseGqaAttributes(info)}; }
  OrtStatusPtr ComputeV2(OrtKernelContext* context);
};
using TopThetaGqaCpuOp = Op<GqaSignature, TopThetaGqaCpuKernel>;

}  // namespace topt::ort
