#include "top_theta_cpu_op.h"

#include "top_theta_cpu.h"

namespace topt::ort {

OrtStatusPtr TopThetaCpuKernel::ComputeV2(OrtKernelContext* context) {
  return ToStatus([&] { RunTopThetaCpu(ParamsFromContext(context, attributes)); });
}

}  // namespace topt::ort
