#include "top_theta_calibrate_op.h"

#include "top_theta_calibrate_cpu.h"

namespace topt::ort {

const char* const kCalibrateInputNames[kNumCalibrateInputs] = {
    "Q", "K", "V", "attn_mask", "past_key", "past_value", "threshold_lengths"};

Attributes ParseCalibrateAttributes(const OrtKernelInfo* info) {
  Attributes a = ParseAttributes(info, kCalibrateOpName);
  if (a.kv_layout != KvLayout::kConcat) {
    Fail(a.op_name, a.node_name, "attribute", "kv_layout", "TopThetaCalibrate supports concat only");
  }
  if (a.calibrated_max_length != 0) {
    Fail(a.op_name, a.node_name, "attribute", "calibrated_max_length", "not an attribute of TopThetaCalibrate");
  }
  // sdc_calibrated's table is what calibration computes: the mass it estimates, the exact one, is used.
  if (a.sdc == Sdc::kCalibrated) a.sdc = Sdc::kExact;
  return a;
}

TopThetaCalibrateParams CalibrateParamsFromContext(OrtKernelContext* raw_context, const Attributes& a) {
  Ort::KernelContext ctx(raw_context);
  const InputChecker c(a, kCalibrateInputNames, ctx);
  TopThetaCalibrateParams cp;
  TopThetaParams& p = cp.attention;
  ReadAttentionInputs(c, a, p);
  ReadThresholdLengths(c, kCalibrateThresholdLengths, /*values_on_host=*/true, p);
  ApplyAttributes(a, p);

  p.y = AllocateOutput(ctx, kY, {p.B, p.Hq, p.S, p.Dv});
  p.present_key = AllocateOutput(ctx, kPresentKey, {p.B, p.Hkv, p.total_kv(), p.Dh});
  p.present_value = AllocateOutput(ctx, kPresentValue, {p.B, p.Hkv, p.total_kv(), p.Dv});
  cp.theta_sums = static_cast<double*>(AllocateOutput(ctx, kThetaSums, {p.Hq, p.L, 3}));
  cp.sdc_sums = static_cast<double*>(AllocateOutput(ctx, kSdcSums, {p.Hq, p.L, 2}));
  p.stats = static_cast<int64_t*>(AllocateOutput(ctx, kCalibrateStats, {p.B, p.Hq, kNumStats}));
  return cp;
}

OrtCustomOpInputOutputCharacteristic CalibrateSignature::InputCharacteristic(size_t i) {
  const bool required = i == kQ || i == kK || i == kV || i == kCalibrateThresholdLengths;
  return required ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
}

ONNXTensorElementDataType CalibrateSignature::OutputType(size_t i, ONNXTensorElementDataType t) {
  switch (i) {
    case kThetaSums:
    case kSdcSums: return ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE;
    case kCalibrateStats: return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
    default: return t;
  }
}

OrtStatusPtr TopThetaCalibrateCpuKernel::ComputeV2(OrtKernelContext* context) {
  return ToStatus([&] { RunTopThetaCalibrateCpu(CalibrateParamsFromContext(context, attributes)); });
}

}  // namespace topt::ort
