// ORT glue shared by every TopThetaAttention op class (CPU, CUDA): the op's signature, its
// attributes, and the TopThetaParams filled from an OrtKernelContext. docs/op.md is the contract.
// Errors throw Ort::Exception(ORT_INVALID_ARGUMENT) naming the node and the input or attribute;
// the op classes turn them into an OrtStatus (ToStatus), so Python gets an exception, never a crash.
#pragma once
#include <string>

#include "onnxruntime_cxx_api.h"
#include "top_theta_params.h"

namespace topt::ort {

inline constexpr const char* kDomain = "ai.topt";
inline constexpr const char* kOpName = "TopThetaAttention";

// Inputs and outputs, in op.md's order.
enum InputIndex : size_t {
  kQ, kK, kV, kAttnMask, kPastKey, kPastValue, kThresholds, kThresholdLengths, kPastSeqlens,
  kPastVSum, kSdcLogMass, kNumInputs
};
enum OutputIndex : size_t { kY, kPresentKey, kPresentValue, kPresentVSum, kStats, kNumOutputs };
extern const char* const kInputNames[kNumInputs];
extern const char* const kOutputNames[kNumOutputs];

// The op's signature for element type T. Only Q is declared T: ORT picks the per-T op instance by
// Q's type. Every other input is declared UNDEFINED (any type) and checked in ParamsFromContext,
// so a wrong dtype is an error that names the input (ORT's own says only "no implementation").
ONNXTensorElementDataType InputType(size_t index, ONNXTensorElementDataType t);
ONNXTensorElementDataType OutputType(size_t index, ONNXTensorElementDataType t);
OrtCustomOpInputOutputCharacteristic InputCharacteristic(size_t index);
OrtCustomOpInputOutputCharacteristic OutputCharacteristic(size_t index);

// The attributes, parsed and validated once per node (at session creation).
struct Attributes {
  std::string node_name;
  bool has_scale = false;  // absent: 1/sqrt(Dh)
  float scale = 0.f;
  bool is_causal = false;
  int64_t k = 0;
  Placement placement = Placement::kPostSoftmax;
  Sdc sdc = Sdc::kNone;
  bool vmc = true;
  KvLayout kv_layout = KvLayout::kConcat;
  int64_t calibrated_max_length = 0;
};
Attributes ParseAttributes(const OrtKernelInfo* info);

// Validates the inputs, allocates the requested outputs and fills the params.
// `values_on_host`: threshold_lengths and past_seqlens are host memory, so their values are
// checked too (increasing; in range). A CUDA op that keeps them on the device passes false.
TopThetaParams ParamsFromContext(OrtKernelContext* context, const Attributes& attributes,
                                 bool values_on_host = true);

DType ToDType(ONNXTensorElementDataType t);

// Runs `body`, turning any exception into an OrtStatus (nullptr on success).
template <typename F>
OrtStatusPtr ToStatus(F&& body) noexcept {
  try {
    body();
    return nullptr;
  } catch (const Ort::Exception& e) {
    return Ort::GetApi().CreateStatus(e.GetOrtErrorCode(), e.what());
  } catch (const std::exception& e) {
    return Ort::GetApi().CreateStatus(ORT_FAIL, e.what());
  }
}

}  // namespace topt::ort
