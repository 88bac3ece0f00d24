// TopThetaAttention on ORT's CPU execution provider: one op instance per T (float32, float16).
#pragma once
#include "top_theta_ort.h"

namespace topt::ort {

struct TopThetaCpuKernel {
  Attributes attributes;
  OrtStatusPtr ComputeV2(OrtKernelContext* context);
};

struct TopThetaCpuOp : Ort::CustomOpBase<TopThetaCpuOp, TopThetaCpuKernel, /*WithStatus=*/true> {
  explicit TopThetaCpuOp(ONNXTensorElementDataType t) : type_(t) {}

  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const;
  const char* GetName() const { return kOpName; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }

  size_t GetInputTypeCount() const { return kNumInputs; }
  ONNXTensorElementDataType GetInputType(size_t i) const { return InputType(i, type_); }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const { return InputCharacteristic(i); }
  size_t GetOutputTypeCount() const { return kNumOutputs; }
  ONNXTensorElementDataType GetOutputType(size_t i) const { return OutputType(i, type_); }
  OrtCustomOpInputOutputCharacteristic GetOutputCharacteristic(size_t i) const { return OutputCharacteristic(i); }

 private:
  ONNXTensorElementDataType type_;
};

}  // namespace topt::ort
