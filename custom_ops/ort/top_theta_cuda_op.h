// TopThetaAttention and TopThetaGroupQueryAttention on ORT's CUDA execution provider (built only
// with TOPT_WITH_CUDA): the same signatures and parsing as the CPU ops; the kernels are
// custom_ops/cuda's launchers on ORT's stream. Every input, threshold_lengths and
// past_seqlens/seqlens_k included, stays in device memory, so their values are not checked here.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <unordered_map>

#include "top_theta_gqa_op.h"
#include "top_theta_ort.h"

namespace topt::ort {

// A device buffer grown with stream-ordered cudaFreeAsync/cudaMallocAsync.
struct Scratch {
  void* p = nullptr;
  int64_t cap = 0, zero_tail = 0;
};

// The GQA front's scratch of prompt calls (S > 1: every prompt token's Q, K, V and Y, 1.6 GB for
// 64 prompts of 8000 tokens) is one buffer per stream shared by every node: nodes enqueue their
// kernels one after another on the stream, so one buffer serves them all, where a buffer per node
// held one copy per layer. Held by the nodes (shared_ptr); freed with the last one.
class PromptScratchPool {
 public:
  static std::shared_ptr<PromptScratchPool> Get();
  ~PromptScratchPool();
  // Hold `mu` from Take until the call's kernels are enqueued: a later Take may free the buffer
  // (stream-ordered, so after what is already enqueued).
  std::mutex mu;
  void* Take(int64_t bytes, cudaStream_t stream, const Attributes& attributes);

 private:
  std::unordered_map<cudaStream_t, Scratch> buffers_;
};

// What a node keeps between calls, per stream: the decode path's scratch (no allocation per call;
// grown with stream-ordered cudaFreeAsync/cudaMallocAsync; its tail holds the launcher's arrival
// counters, which must be zero at launch (top_theta_cuda.h) — kept so by the invariant that the
// last `zero_tail` bytes are zero between calls), the GQA front's scratch, and the running V sums.
class CudaNodeState {
 public:
  CudaNodeState() : prompt_pool(PromptScratchPool::Get()) {}
  ~CudaNodeState();
  // Enqueues the op for `p` on `stream` (workspace and running V sum filled in here). `front`, if
  // given, enqueues the GQA front's kernel right before the op's (after any memset of the scratch).
  void Launch(TopThetaParams& p, cudaStream_t stream, const Attributes& attributes,
              const std::function<void()>& front = {});
  // Scratch of at least `bytes` for the GQA front of a decode call, valid for the calls queued on `stream`.
  void* DecodeFrontScratch(int64_t bytes, cudaStream_t stream, const Attributes& attributes);
  const std::shared_ptr<PromptScratchPool> prompt_pool;  // the front's scratch of prompt calls

 private:
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
  std::unordered_map<ScratchKey, Scratch, ScratchKeyHash> scratch_;
  std::unordered_map<cudaStream_t, Scratch> front_;  // decode calls' GQA front scratch
  std::unordered_map<const void*, VSumState> vsum_states_;
  uint64_t calls_ = 0;
};

struct TopThetaCudaKernel {
  Attributes attributes;
  CudaNodeState state;
  static TopThetaCudaKernel* Create(const OrtKernelInfo* info) { return new TopThetaCudaKernel{ParseAttributes(info), {}}; }
  OrtStatusPtr ComputeV2(OrtKernelContext* context);
};
using TopThetaCudaOp = Op<AttentionSignature, TopThetaCudaKernel>;

struct TopThetaGqaCudaKernel {
  GqaAttributes attributes;
  CudaNodeState state;
  static TopThetaGqaCudaKernel* Create(const OrtKernelInfo* info) { return new TopThetaGqaCudaKernel{ParseGqaAttributes(info), {}}; }
  OrtStatusPtr ComputeV2(OrtKernelContext* context);
};
using TopThetaGqaCudaOp = Op<GqaSignature, TopThetaGqaCudaKernel>;

}  // namespace topt::ort
