// The registration table: every op of the library, in domain ai.topt, opset 1.
// Python: SessionOptions.register_custom_ops_library(topt_compile._library.get_library_path()).
#include <mutex>
#include <vector>

#include "top_theta_calibrate_op.h"
#include "top_theta_cpu_op.h"
#include "top_theta_gqa_op.h"
#ifdef TOPT_WITH_CUDA
#include "top_theta_cuda_op.h"  // custom_ops/cuda: TopThetaCudaOp, TopThetaGqaCudaOp, same signatures
#endif

namespace {

using topt::ort::TopThetaCalibrateCpuOp;
using topt::ort::TopThetaCpuOp;

// Static: ORT keeps pointers to the ops for the lifetime of every session that uses them.
const TopThetaCpuOp kCpuFloat(ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, topt::ort::kCpuProvider);
const TopThetaCpuOp kCpuFloat16(ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16, topt::ort::kCpuProvider);
const topt::ort::TopThetaGqaCpuOp kGqaCpuFloat(ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, topt::ort::kCpuProvider);
const topt::ort::TopThetaGqaCpuOp kGqaCpuFloat16(ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16, topt::ort::kCpuProvider);
const TopThetaCalibrateCpuOp kCalibrateCpuFloat(ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, topt::ort::kCpuProvider);
const TopThetaCalibrateCpuOp kCalibrateCpuFloat16(ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16, topt::ort::kCpuProvider);
#ifdef TOPT_WITH_CUDA
const topt::ort::TopThetaCudaOp kCudaFloat(ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, topt::ort::kCudaProvider);
const topt::ort::TopThetaCudaOp kCudaFloat16(ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16, topt::ort::kCudaProvider);
const topt::ort::TopThetaCudaOp kCudaBFloat16(ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16, topt::ort::kCudaProvider);
const topt::ort::TopThetaGqaCudaOp kGqaCudaFloat(ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, topt::ort::kCudaProvider);
const topt::ort::TopThetaGqaCudaOp kGqaCudaFloat16(ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16, topt::ort::kCudaProvider);
const topt::ort::TopThetaGqaCudaOp kGqaCudaBFloat16(ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16, topt::ort::kCudaProvider);
#endif

}  // namespace

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  // The library asks for API version 21 (the headers it was built with): any newer runtime has it.
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (!api) return nullptr;  // older than 1.21: nothing to report through
  Ort::InitApi(api);
  return topt::ort::ToStatus([&] {
    Ort::CustomOpDomain domain(topt::ort::kDomain);
    domain.Add(&kCpuFloat);
    domain.Add(&kCpuFloat16);
    domain.Add(&kGqaCpuFloat);
    domain.Add(&kGqaCpuFloat16);
    domain.Add(&kCalibrateCpuFloat);
    domain.Add(&kCalibrateCpuFloat16);
#ifdef TOPT_WITH_CUDA
    domain.Add(&kCudaFloat);
    domain.Add(&kCudaFloat16);
    domain.Add(&kCudaBFloat16);
    domain.Add(&kGqaCudaFloat);
    domain.Add(&kGqaCudaFloat16);
    domain.Add(&kGqaCudaBFloat16);
#endif
    Ort::UnownedSessionOptions(options).Add(domain);
    // The domain must outlive the sessions, and ORT keeps only its pointer: keep them all.
    static std::mutex mutex;
    static std::vector<Ort::CustomOpDomain> domains;
    std::lock_guard<std::mutex> lock(mutex);
    domains.push_back(std::move(domain));
  });
}
