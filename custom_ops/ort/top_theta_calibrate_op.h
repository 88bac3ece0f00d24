// TopThetaCalibrate on ORT's CPU execution provider (docs/op.md, last section): one op instance
// per T (float32, float16). Inputs 0-5 and the attributes are parsed by top_theta_ort's pieces.
#pragma once
#include "top_theta_ort.h"

namespace topt::ort {

inline constexpr const char* kCalibrateOpName = "TopThetaCalibrate";

// Inputs 0-5 and outputs 0-2 are TopThetaAttention's (kQ … kPastValue, kY … kPresentValue).
enum CalibrateInputIndex : size_t { kCalibrateThresholdLengths = kPastValue + 1, kNumCalibrateInputs };
enum CalibrateOutputIndex : size_t { kThetaSums = kPresentValue + 1, kSdcSums, kCalibrateStats, kNumCalibrateOutputs };
extern const char* const kCalibrateInputNames[kNumCalibrateInputs];

// The parsed node: TopThetaAttention's attributes less kv_layout (concat) and calibrated_max_length.
Attributes ParseCalibrateAttributes(const OrtKernelInfo* info);
// Validates the inputs, allocates the requested outputs and fills the params.
TopThetaCalibrateParams CalibrateParamsFromContext(OrtKernelContext* context, const Attributes& attributes);

// As TopThetaAttention: only Q is declared T, the rest is checked with errors naming the input.
struct CalibrateSignature {
  static constexpr const char* kName = kCalibrateOpName;
  static constexpr size_t kInputs = kNumCalibrateInputs, kOutputs = kNumCalibrateOutputs;
  static ONNXTensorElementDataType InputType(size_t i, ONNXTensorElementDataType t) { return ort::InputType(i, t); }
  static ONNXTensorElementDataType OutputType(size_t i, ONNXTensorElementDataType t);
  static OrtCustomOpInputOutputCharacteristic InputCharacteristic(size_t i);
  static OrtCustomOpInputOutputCharacteristic OutputCharacteristic(size_t i) { return ort::OutputCharacteristic(i); }
  static OrtMemType InputMemoryType(size_t) { return OrtMemTypeDefault; }
};

struct TopThetaCalibrateCpuKernel {
  Attributes attributes;
  static TopThetaCalibrateCpuKernel* Create(const OrtKernelInfo* info) {
    return new TopThetaCalibrateCpuKernel{ParseCalibrateAttributes(info)};
  }
  OrtStatusPtr ComputeV2(OrtKernelContext* context);
};
using TopThetaCalibrateCpuOp = Op<CalibrateSignature, TopThetaCalibrateCpuKernel>;

}  // namespace topt::ort
