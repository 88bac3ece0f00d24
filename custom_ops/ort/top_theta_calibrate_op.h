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

struct TopThetaCalibrateCpuKernel {
  Attributes attributes;
  OrtStatusPtr ComputeV2(OrtKernelContext* context);
};

struct TopThetaCalibrateCpuOp
    : Ort::CustomOpBase<TopThetaCalibrateCpuOp, TopThetaCalibrateCpuKernel, /*WithStatus=*/true> {
  explicit TopThetaCalibrateCpuOp(ONNXTensorElementDataType t) : type_(t) {}

  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const;
  const char* GetName() const { return kCalibrateOpName; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }

  // As TopThetaAttention: only Q is declared T, the rest is checked with errors naming the input.
  size_t GetInputTypeCount() const { return kNumCalibrateInputs; }
  ONNXTensorElementDataType GetInputType(size_t i) const { return InputType(i, type_); }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const;
  size_t GetOutputTypeCount() const { return kNumCalibrateOutputs; }
  ONNXTensorElementDataType GetOutputType(size_t i) const;
  OrtCustomOpInputOutputCharacteristic GetOutputCharacteristic(size_t i) const { return OutputCharacteristic(i); }

 private:
  ONNXTensorElementDataType type_;
};

}  // namespace topt::ort
