// TopThetaAttention and TopThetaGroupQueryAttention on ORT's CUDA execution provider (built only
// with TOPT_WITH_CUDA): the same signatures and parsing as the CPU ops; the kernels are
// custom_ops/cuda's launchers on ORT's stream. Every input, threshold_lengths and
// past_seqlens/seqlens_k included, stays in device memory, so their values are not checked here.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <mutex>
#include <unordered_map>

#include "top_theta_gqa_op.h"
#include "top_theta_ort.h"

namespace topt::ort {

// What a node keeps between calls, per stream: the decode path's scratch (no allocation per call;
// grown with stream-ordered cudaFreeAsync/cudaMallocAsync; its tail holds the launcher's arrival
// counters, which must be zero at launch (top_theta_cuda.h) — kept so by the invariant that the
// last `zero_tail` bytes are zero between calls), the GQA front's scratch, and the running V sums.
class CudaNodeState {
 public:
  ~CudaNodeState();
  // Enqueues the op for `p` on `stream` (workspace and running V sum filled in here).
  void Launch(TopThetaParams& p, cudaStream_t stream, const Attributes& attributes);
  // Scratch of at least `bytes` for the GQA front, valid for the calls queued on `stream`.
  void* FrontScratch(int64_t bytes, cudaStream_t stream, const Attributes& attributes);

 private:
  struct Scratch {
    void* p = nullptr;
    int64_t cap = 0, zero_tail = 0;
  };
  // Running V sums (TopThetaParams::vsum_state) of in-place shared_buffer caches, one per cache
  // buffer (keyed by its device address, so concurrent runs on other buffers never share one);
  // the least recently used is dropped past kMaxVSumStates.
  struct VSumState {
    float* sum = nullptr;
    int32_t* len = nullptr;
    int64_t B = 0, Hkv = 0, Dv = 0;
    cudaStream_t stream = nullptr;
    uint64_t used = 0;
  };
  static constexpr size_t kMaxVSumStates = 8;
  VSumState& StateFor(const TopThetaParams& p, cudaStream_t stream, const Attributes& attributes);

  std::mutex mu_;  // held until a launch is enqueued (stream order does the rest)
  std::unordered_map<cudaStream_t, Scratch> scratch_, front_;
  std::unordered_map<const void*, VSumState> vsum_states_;
  uint64_t calls_ = 0;
};

struct TopThetaCudaKernel {
  Attributes attributes;
  CudaNodeState state;
  explicit TopThetaCudaKernel(Attributes a) : attributes(std::move(a)) {}
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

struct TopThetaGqaCudaKernel {
  GqaAttributes attributes;
  CudaNodeState state;
  explicit TopThetaGqaCudaKernel(GqaAttributes a) : attributes(std::move(a)) {}
  OrtStatusPtr ComputeV2(OrtKernelContext* context);
};

struct TopThetaGqaCudaOp : Ort::CustomOpBase<TopThetaGqaCudaOp, TopThetaGqaCudaKernel, /*WithStatus=*/true> {
  explicit TopThetaGqaCudaOp(ONNXTensorElementDataType t) : type_(t) {}

  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const;
  const char* GetName() const { return kGqaOpName; }
  const char* GetExecutionProviderType() const { return "CUDAExecutionProvider"; }

  size_t GetInputTypeCount() const { return kGqaNumInputs; }
  ONNXTensorElementDataType GetInputType(size_t i) const { return GqaInputType(i, type_); }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const { return GqaInputCharacteristic(i); }
  size_t GetOutputTypeCount() const { return kNumOutputs; }
  ONNXTensorElementDataType GetOutputType(size_t i) const { return OutputType(i, type_); }
  OrtCustomOpInputOutputCharacteristic GetOutputCharacteristic(size_t i) const { return OutputCharacteristic(i); }

 private:
  ONNXTensorElementDataType type_;
};

}  // namespace topt::ort
