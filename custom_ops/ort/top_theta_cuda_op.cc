#include "top_theta_cuda_op.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <string>

#include "top_theta_cuda.h"  // custom_ops/cuda: topt::LaunchTopThetaCuda(const TopThetaParams&, cudaStream_t)

namespace topt::ort {

OrtStatusPtr TopThetaCudaOp::CreateKernelV2(const OrtApi&, const OrtKernelInfo* info, void** kernel) const {
  return ToStatus([&] { *kernel = new TopThetaCudaKernel(ParseAttributes(info)); });
}

TopThetaCudaKernel::~TopThetaCudaKernel() {
  for (auto& [stream, sc] : scratch)
    if (sc.p) cudaFree(sc.p);  // synchronizes: no launch still uses it
}

OrtStatusPtr TopThetaCudaKernel::ComputeV2(OrtKernelContext* context) {
  return ToStatus([&] {
    TopThetaParams p = ParamsFromContext(context, attributes, /*values_on_host=*/false);
    auto stream = static_cast<cudaStream_t>(Ort::KernelContext(context).GetGPUComputeStream());
    const auto fail = [&](cudaError_t error) {
      throw Ort::Exception(std::string(kOpName) + " node '" + attributes.node_name +
                               "': CUDA scratch failed: " + cudaGetErrorString(error), ORT_FAIL);
    };
    std::unique_lock<std::mutex> lock(mu);  // held until the launch is enqueued (stream order does the rest)
    if (const int64_t bytes = TopThetaCudaWorkspaceBytes(p); bytes > 0) {
      const int64_t tail = TopThetaCudaWorkspaceZeroTailBytes(p), data = bytes - tail;
      Scratch& sc = scratch[stream];
      if (sc.cap < bytes) {  // grow: the old buffer is freed after the calls queued on it
        if (sc.p) cudaFreeAsync(sc.p, stream);
        sc = Scratch{};
        const int64_t cap = std::max<int64_t>(bytes, 1 << 20);
        if (const cudaError_t e = cudaMallocAsync(&sc.p, size_t(cap), stream); e != cudaSuccess) fail(e);
        if (const cudaError_t e = cudaMemsetAsync(sc.p, 0, size_t(cap), stream); e != cudaSuccess) fail(e);
        sc.cap = cap;
        sc.zero_tail = cap;
      } else if (const int64_t from = (sc.cap - tail) / 16 * 16; sc.zero_tail < sc.cap - from) {
        // a larger counter region than any call since the allocation: zero it once
        if (const cudaError_t e = cudaMemsetAsync(static_cast<char*>(sc.p) + from, 0, size_t(sc.cap - from), stream);
            e != cudaSuccess)
          fail(e);
        sc.zero_tail = sc.cap - from;
      }
      p.workspace = sc.p;
      p.workspace_bytes = sc.cap;  // counters at the end of cap, data at the front (cap >= data + tail)
      sc.zero_tail = std::min(sc.zero_tail, sc.cap - (data + 15) / 16 * 16);
    }
    if (const cudaError_t error = LaunchTopThetaCuda(p, stream); error != cudaSuccess) {
      throw Ort::Exception(std::string(kOpName) + " node '" + attributes.node_name +
                               "': CUDA launch failed: " + cudaGetErrorString(error), ORT_FAIL);
    }
  });
}

}  // namespace topt::ort
