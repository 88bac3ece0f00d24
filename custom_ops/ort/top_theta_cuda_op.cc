#include "top_theta_cuda_op.h"

#include <cuda_runtime.h>

#include <string>

#include "top_theta_cuda.h"  // custom_ops/cuda: topt::LaunchTopThetaCuda(const TopThetaParams&, cudaStream_t)

namespace topt::ort {

OrtStatusPtr TopThetaCudaOp::CreateKernelV2(const OrtApi&, const OrtKernelInfo* info, void** kernel) const {
  return ToStatus([&] { *kernel = new TopThetaCudaKernel{ParseAttributes(info)}; });
}

OrtStatusPtr TopThetaCudaKernel::ComputeV2(OrtKernelContext* context) {
  return ToStatus([&] {
    const TopThetaParams p = ParamsFromContext(context, attributes, /*values_on_host=*/false);
    auto stream = static_cast<cudaStream_t>(Ort::KernelContext(context).GetGPUComputeStream());
    if (const cudaError_t error = LaunchTopThetaCuda(p, stream); error != cudaSuccess) {
      throw Ort::Exception(std::string(kOpName) + " node '" + attributes.node_name +
                               "': CUDA launch failed: " + cudaGetErrorString(error), ORT_FAIL);
    }
  });
}

}  // namespace topt::ort
