#include "top_theta_cuda_op.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <string>

#include "top_theta_cuda.h"  // custom_ops/cuda: LaunchTopThetaCuda, LaunchGqaPrep/Output

namespace topt::ort {

namespace {
void Check(cudaError_t error, const Attributes& attributes, const char* what) {
  if (error != cudaSuccess)
    throw Ort::Exception(std::string(attributes.op_name) + " node '" + attributes.node_name + "': " + what + ": " +
                             cudaGetErrorString(error), ORT_FAIL);
}

// A decode loop over an in-place cache (present bound to past, as onnxruntime-genai and
// topt_compile.generate do) without a past_v_sum input: the glue keeps the running V sum.
bool WantsVSumState(const TopThetaParams& p) {
  return p.kv_layout == KvLayout::kSharedBuffer && p.past_value && p.present_value == p.past_value && !p.past_v_sum &&
         p.mask_kind == MaskKind::kNone && (p.vmc || p.present_v_sum);
}

// Grows `sc` to at least `bytes` (at least `min_cap`): the old buffer is freed after the calls
// queued on it. Returns whether it grew.
bool Grow(Scratch& sc, int64_t bytes, int64_t min_cap, cudaStream_t stream, const Attributes& attributes) {
  if (sc.cap >= bytes) return false;
  if (sc.p) cudaFreeAsync(sc.p, stream);
  sc = Scratch{};
  const int64_t cap = std::max<int64_t>(bytes, min_cap);
  Check(cudaMallocAsync(&sc.p, size_t(cap), stream), attributes, "CUDA scratch");
  sc.cap = cap;
  return true;
}
}  // namespace

std::shared_ptr<PromptScratchPool> PromptScratchPool::Get() {
  static std::mutex registry_mu;
  static std::weak_ptr<PromptScratchPool> registry;  // not owning: the pool goes with its last node
  std::lock_guard<std::mutex> lock(registry_mu);
  auto pool = registry.lock();
  if (!pool) registry = pool = std::make_shared<PromptScratchPool>();
  return pool;
}

PromptScratchPool::~PromptScratchPool() {
  for (auto& [stream, sc] : buffers_)
    if (sc.p) cudaFree(sc.p);  // synchronizes: no launch still uses it
}

void* PromptScratchPool::Take(int64_t bytes, cudaStream_t stream, const Attributes& attributes) {
  Scratch& sc = buffers_[stream];
  Grow(sc, bytes, 1 << 20, stream, attributes);
  return sc.p;
}

CudaNodeState::~CudaNodeState() {
  for (auto& [key, sc] : scratch_)
    if (sc.p) cudaFree(sc.p);  // synchronizes: no launch still uses it
  for (auto& [stream, sc] : front_)
    if (sc.p) cudaFree(sc.p);
  for (auto& [key, st] : vsum_states_) cudaFree(st.sum);
}

void* CudaNodeState::DecodeFrontScratch(int64_t bytes, cudaStream_t stream, const Attributes& attributes) {
  std::lock_guard<std::mutex> lock(mu_);
  Grow(front_[stream], bytes, 1 << 16, stream, attributes);
  return front_[stream].p;
}

CudaNodeState::VSumState& CudaNodeState::StateFor(const TopThetaParams& p, cudaStream_t stream, const Attributes& attributes) {
  VSumState& st = vsum_states_[p.past_value];
  if (st.sum && (st.B != p.B || st.Hkv != p.Hkv || st.Dv != p.Dv)) {
    cudaFreeAsync(st.sum, st.stream);
    st = VSumState{};
  }
  if (!st.sum) {  // one allocation: 2 slots of sums, then 2 slots of lengths (-1: invalid)
    const size_t sums = size_t(2 * p.B * p.Hkv * p.Dv) * sizeof(float);
    void* mem = nullptr;
    Check(cudaMallocAsync(&mem, sums + size_t(2 * p.B) * sizeof(int32_t), stream), attributes, "CUDA V-sum state");
    st.sum = static_cast<float*>(mem);
    st.len = reinterpret_cast<int32_t*>(static_cast<char*>(mem) + sums);
    Check(cudaMemsetAsync(st.len, 0xff, size_t(2 * p.B) * sizeof(int32_t), stream), attributes, "CUDA V-sum state");
    st.B = p.B, st.Hkv = p.Hkv, st.Dv = p.Dv;
  }
  st.stream = stream;
  st.used = ++calls_;
  if (vsum_states_.size() > kMaxVSumStates) {  // drop the least recently used (never this one: just used)
    auto oldest = vsum_states_.begin();
    for (auto it = vsum_states_.begin(); it != vsum_states_.end(); ++it)
      if (it->second.used < oldest->second.used) oldest = it;
    cudaFreeAsync(oldest->second.sum, oldest->second.stream);
    vsum_states_.erase(oldest);
  }
  return vsum_states_[p.past_value];
}

void CudaNodeState::Launch(TopThetaParams& p, cudaStream_t stream, const Attributes& attributes,
                           const std::function<void()>& front) {
  std::lock_guard<std::mutex> lock(mu_);
  if (WantsVSumState(p)) {  // first: the workspace size depends on it
    VSumState& st = StateFor(p, stream, attributes);
    p.vsum_state = st.sum;
    p.vsum_state_len = st.len;
  }
  if (const int64_t bytes = TopThetaCudaWorkspaceBytes(p); bytes > 0) {
    const int64_t tail = TopThetaCudaWorkspaceZeroTailBytes(p), data = bytes - tail;
    Scratch& sc = scratch_[ScratchKey{stream, p.S == 1}];
    if (Grow(sc, bytes, 1 << 20, stream, attributes)) {  // a new buffer: all of it zero
      Check(cudaMemsetAsync(sc.p, 0, size_t(sc.cap), stream), attributes, "CUDA scratch");
      sc.zero_tail = sc.cap;
    } else if (const int64_t from = (sc.cap - tail) / 16 * 16; sc.zero_tail < sc.cap - from) {
      // a larger counter region than any call since the allocation: zero it once
      Check(cudaMemsetAsync(static_cast<char*>(sc.p) + from, 0, size_t(sc.cap - from), stream), attributes, "CUDA scratch");
      sc.zero_tail = sc.cap - from;
    }
    p.workspace = sc.p;
    p.workspace_bytes = sc.cap;  // counters at the end of cap, data at the front (cap >= data + tail)
    sc.zero_tail = std::min(sc.zero_tail, sc.cap - (data + 15) / 16 * 16);
  }
  if (front) front();
  Check(LaunchTopThetaCuda(p, stream), attributes, "CUDA launch failed");
}

OrtStatusPtr TopThetaCudaKernel::ComputeV2(OrtKernelContext* context) {
  return ToStatus([&] {
    TopThetaParams p = ParamsFromContext(context, attributes, /*values_on_host=*/false);
    state.Launch(p, static_cast<cudaStream_t>(Ort::KernelContext(context).GetGPUComputeStream()), attributes);
  });
}

OrtStatusPtr TopThetaGqaCudaKernel::ComputeV2(OrtKernelContext* context) {
  return ToStatus([&] {
    const Attributes& a = attributes.base;
    GqaCall call = GqaCallFromContext(context, attributes, /*values_on_host=*/false);
    auto stream = static_cast<cudaStream_t>(Ort::KernelContext(context).GetGPUComputeStream());
    if (call.p.S == 1) {
      PlaceGqaScratch(call, state.DecodeFrontScratch(call.scratch_bytes, stream, a));
      // The front right before the split kernel, which reads past = seqlens_k (S = 1) from the input,
      // not the front's copy, and so starts on the past K while the front runs (after_decode_front).
      call.p.past_seqlens = call.prep.seqlens_k;
      call.p.after_decode_front = true;
      state.Launch(call.p, stream, a, [&] { Check(LaunchGqaPrep(call.prep, stream), a, "CUDA launch failed"); });
      return;
    }
    std::lock_guard<std::mutex> lock(state.prompt_pool->mu);  // until the kernels using it are enqueued
    PlaceGqaScratch(call, state.prompt_pool->Take(call.scratch_bytes, stream, a));
    Check(LaunchGqaPrep(call.prep, stream), a, "CUDA launch failed");
    state.Launch(call.p, stream, a);
    Check(LaunchGqaOutput(call.out, stream), a, "CUDA launch failed");
  });
}

}  // namespace topt::ort
