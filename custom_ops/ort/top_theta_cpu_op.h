// TopThetaAttention on ORT's CPU execution provider: one op instance per T (float32, float16).
#pragma once
#include "top_theta_ort.h"

namespace topt::ort {

struct TopThetaCpuKernel {
  Attributes attributes;
  static TopThetaCpuKernel* Create(const OrtKernelInfo* info) { return new TopThetaCpuKernel{ParseAttributes(info)}; }
  OrtStatusPtr ComputeV2(OrtKernelContext* context);
};
using TopThetaCpuOp = Op<AttentionSignature, TopThetaCpuKernel>;

}  // namespace topt::ort
