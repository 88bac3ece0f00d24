// TopThetaAttention and TopThetaGroupQueryAttention on ORT's CUDA execution provider (built only
// with TOPT_WITH_CUDA): the same signatures and parsing as the CPU ops; the kernels are
// custom_ops/cuda's launchers on ORT's stream. Every input, threshold_lengths and
// past_seqlens/seqlens_k included, stays in device memory, so their values are not checked here.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <functional>
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
  void* FrontScratch(int64_t bytes, bool decode, cudaStream_t stream, const Attributes& attributes);

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
  static bool Grow(Scratch& sc, int64_t bytes, int64_t min_cap, cudaStream_t stream, const Attributes& attributes);

  // Scratch is kept per (stream, decode or not): a prompt call never frees or moves the buffers of
  // decode calls, whose addresses a captured CUDA graph (ORT's enable_cuda_graph) replays.
  struct ScratchKey {
    cudaStream_t stream;
    bool decode;
    bool operator==(const ScratchKey& o) const { return stream == o.stream && decode == o.decode; }
  };
  struct ScratchKeyHash {
    size_t operator()(const ScratchKey& k) const { return std::hash<const void*>()(k.stream) * 2 + k.decode; }
  };

  std::mutex mu_;  // held until a launch is enqueued (stream order does the rest)
  std::unordered_map<ScratchKey, Scratch, ScratchKeyHash> scratch_, front_;
  std::unordered_map<const void*, VSumState> vsum_states_;
  uint64_t calls_ = 0;
};

struct TopThetaCudaKernel {
  Attributes attributes;
  CudaNodeState state;
  static TopThetaCudaKernel* Create(const OrtKernelInfo* info) { return new TopThetaCudaKernel{ParseAttributes(info)}; }
  OrtStatusPtr ComputeV2(OrtKernelContext* context);
};
using TopThetaCudaOp = Op<AttentionSignature, TopThetaCudaKernel>;

struct TopThetaGqaCudaKernel {
  GqaAttributes attributes;
  CudaNodeState state;
  static TopThetaGqaCudaKernel* Create(const OrtKernelInfo* info) { return new TopThetaGqaCudaKernel{ParseGqaAttributes(info)}; }
  OrtStatusPtr ComputeV2(OrtKernelContext* context);
};
using TopThetaGqaCudaOp = Op<GqaSignature, TopThetaGqaCudaKernel>;

}  // namespace topt::ort
