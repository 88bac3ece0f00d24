#include "top_theta_cpu_op.h"

#include "top_theta_cpu.h"

namespace topt::ort {

OrtStatusPtr TopThetaCpuOp::CreateKernelV2(const OrtApi&, const OrtKernelInfo* info, void** kernel) const {
  return ToStatus([&] { *kernel = new TopThetaCpuKernel{ParseAttributes(info)}; });
}

OrtStatusPtr TopThetaCpuKernel::ComputeV2(OrtKernelContext* context) {
  return ToStatus([&] { RunTopThetaCpu(ParamsFromContext(context, attributes)); });
}

}  // namespace topt::ort
