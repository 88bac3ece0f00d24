// TopThetaAttention on ORT's CUDA execution provider (built only with TOPT_WITH_CUDA): the same
// signature and parsing as the CPU op; the kernel is custom_ops/cuda's launcher on ORT's stream.
// Every input, threshold_lengths and past_seqlens included, stays in device memory, so their
// values are not checked here (the launcher gets device pointers).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <mutex>
#include <unordered_map>

#include "top_theta_ort.h"

namespace topt::ort {

// Scratch of the decode path, cached per kernel and stream (no allocation per call): grown on
// demand with stream-ordered cudaFreeAsync/cudaMallocAsync; its tail holds the launcher's arrival
// counters, which must be zero at launch (top_theta_cuda.h) — kept so by the invariant that the
// last `zero_tail` bytes are zero between calls (the data part of a call never reaches them).
struct TopThetaCudaKernel {
  Attributes attributes;
  struct Scratch {
    void* p = nullptr;
    int64_t cap = 0, zero_tail = 0;
  };
  std::mutex mu;
  std::unordered_map<cudaStream_t, Scratch> scratch;

  TopThetaCudaKernel(Attributes a) : attributes(std::move(a)) {}
  ~TopThetaCudaKernel();
  OrtStatusPtr ComputeV2(OrtKernelContext* context);
};

struct TopThetaCudaOp : Ort::CustomOpBase<TopThetaCudaOp, TopThetaCudaKernel, /*WithStatus=*/true> {
  explicit TopThetaCudaOp(ONNXTensorElementDataType t) : type_(t) {}

  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const;
  const char* GetName() const { return kOpName; }
  const char* GetExecutionProviderType() const { return "CUDAExecutionProvider"; }

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
