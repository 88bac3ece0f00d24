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

struct TopThetaGqaCpuKernel {
  GqaAttributes attributes;
  OrtStatusPtr ComputeV2(OrtKernelContext* context);
};

struct TopThetaGqaCpuOp : Ort::CustomOpBase<TopThetaGqaCpuOp, TopThetaGqaCpuKernel, /*WithStatus=*/true> {
  explicit TopThetaGqaCpuOp(ONNXTensorElementDataType t) : type_(t) {}

  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const;
  const char* GetName() const { return kGqaOpName; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }

  size_t GetInputTypeCount() const { return kGqaNumInputs; }
  ONNXTensorElementDataType GetInputType(size_t i) const { return GqaInputType(i, type_); }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const { return GqaInputCharacteristic(i); }
  size_t GetOutputTypeCount() const { return kNumOutputs; }
  ONNXTensorElementDataType GetOutputType(size_t i) const { return OutputType(i, type_); }
  OrtCustomOpInputOutputCharacteristic GetOutputCharacteristic(size_t i) const { return OutputCharacteristic(i); }

 private:
  ONNXTensorElementDataType type_;
};

}  // namespace topt::ort
