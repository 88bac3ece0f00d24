// Generic TopThetaAttention kernel: any S, head dims, mask, causal, group size G. One CTA per
// (query row i, kv head g, batch b) computes the G query heads of the group together (so the
// union of kept V rows, stats[..., 5], needs no second kernel). Two passes over the row's keys:
// 1) n, mx, Z per head (online softmax); 2) keep decisions, then Σ e_j·v_j over kept rows and the
// v̄ sum, a chunk of 128 keys at a time. Correct first; the fast path is tt_decode.cu.
#include "tt_common.cuh"
#include "tt_internal.h"

namespace topt {
namespace cuda_detail {
namespace {

constexpr int kThreads = 128;  // also the keys per chunk in pass 2

// Shared memory (floats unless noted), G heads:
//   q[G][Dh] (scaled)  acc[G][Dv]  vs[G][Dv]  w[G][128]  vf[G][128]
//   part_D[G][128] part_drop[G][128] (per-thread partials)  part_kept[G][128] (int)
//   head_*[G]: mx, Z, n, nan, rule  red[32]
struct Smem {
  float *q, *acc, *vs, *w, *vf, *part_D, *part_drop, *mx, *Z, *theta, *log_mass;
  int *part_kept, *n, *nan, *dense, *ukeep;
  float* red;
};

__host__ __device__ inline size_t SmemBytes(int64_t G, int64_t Dh, int64_t Dv) {
  return sizeof(float) * size_t(G * Dh + 2 * G * Dv + 4 * G * kThreads + 4 * G + 32) +
         sizeof(int) * size_t(G * kThreads + 3 * G + kThreads);
}

__device__ Smem CarveSmem(char* base, int64_t G, int64_t Dh, int64_t Dv) {
  Smem s;
  float* f = reinterpret_cast<float*>(base);
  s.q = f; f += G * Dh;
  s.acc = f; f += G * Dv;
  s.vs = f; f += G * Dv;
  s.w = f; f += G * kThreads;
  s.vf = f; f += G * kThreads;
  s.part_D = f; f += G * kThreads;
  s.part_drop = f; f += G * kThreads;
  s.mx = f; f += G;
  s.Z = f; f += G;
  s.theta = f; f += G;
  s.log_mass = f; f += G;
  s.red = f; f += 32;
  int* i = reinterpret_cast<int*>(f);
  s.part_kept = i; i += G * kThreads;
  s.n = i; i += G;
  s.nan = i; i += G;
  s.dense = i; i += G;
  s.ukeep = i; i += kThreads;
  return s;
}

template <typename Op>
__device__ float BlockReduce(float v, float* red, Op op) {
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  v = red[0];
  for (int k = 1; k < kThreads / 32; ++k) v = op(v, red[k]);
  return v;
}

struct Max { __device__ float operator()(float a, float b) const { return fmaxf(a, b); } };
struct Sum { __device__ float operator()(float a, float b) const { return a + b; } };

template <typename T>
__device__ __forceinline__ float Dot(const float* q, const T* k, int64_t Dh) {
  // 8 interleaved partial sums combined pairwise, as the CPU kernel's Dot: a float32 rounding
  // error of about Dh/8 + 3 steps instead of Dh (fp32 rows of Dh 128 missed the harness tolerance).
  float part[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t d = 0;
  for (; d + 8 <= Dh; d += 8)
#pragma unroll
    for (int l = 0; l < 8; ++l) part[l] = fmaf(q[d + l], ToF<T>(k[d + l]), part[l]);
  float s = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
  for (; d < Dh; ++d) s = fmaf(q[d], ToF<T>(k[d]), s);
  return s;
}

// grid (S, Hkv, B), block kThreads, dynamic smem SmemBytes(G, Dh, Dv).
template <typename T>
__global__ void __launch_bounds__(kThreads) GenericKernel(TopThetaParams p) {
  extern __shared__ __align__(16) char smem_raw[];
  const int64_t i = blockIdx.x, g = blockIdx.y, b = blockIdx.z;
  const int64_t G = p.Hq / p.Hkv, Dh = p.Dh, Dv = p.Dv;
  const int tid = threadIdx.x;
  Smem s = CarveSmem(smem_raw, G, Dh, Dv);
  const KvGeom geo = GetGeom(p, b);
  const int64_t end = RowEnd(p, geo, i);

  // q[G][Dh] ← scale · Q[b, g·G + r, i, :]   (Q: [B, Hq, S, Dh])
  for (int64_t x = tid; x < G * Dh; x += kThreads) {
    const int64_t r = x / Dh, d = x % Dh;
    s.q[x] = p.scale * ToF<T>(static_cast<const T*>(p.q)[((b * p.Hq + g * G + r) * p.S + i) * Dh + d]);
  }
  for (int64_t x = tid; x < G * Dv; x += kThreads) s.acc[x] = s.vs[x] = 0.f;
  __syncthreads();

  // Pass 1: per head, n, mx (NaN excluded), Z = Σ exp(a - mx), NaN flag.
  for (int64_t r = 0; r < G; ++r) {
    const int64_t h = g * G + r, mbase = MaskBase(p, b, h, i);
    float m = -INFINITY, z = 0.f, cnt = 0.f, nan = 0.f;
    for (int64_t j = tid; j < end; j += kThreads) {
      float add;
      if (!MaskVisible<T>(p, mbase, j, add)) continue;
      cnt += 1.f;
      const float a = Dot(s.q + r * Dh, KvRow<T>(p.past_key, p.k_new, p, geo, b, g, j, Dh), Dh) + add;
      if (isnan(a)) { nan = 1.f; continue; }
      if (a == -INFINITY) continue;
      if (a > m) { z = z * expf(m - a) + 1.f; m = a; } else { z += expf(a - m); }
    }
    const float mx = BlockReduce(m, s.red, Max());
    const float Z = BlockReduce(mx == -INFINITY ? 0.f : z * expf(m - mx), s.red, Sum());
    const float n = BlockReduce(cnt, s.red, Sum());
    const float any_nan = BlockReduce(nan, s.red, Max());
    if (tid == 0) {
      s.mx[r] = mx;
      s.Z[r] = Z;
      s.n[r] = int(n);
      s.nan[r] = any_nan > 0.f;
      const RowRule rule = GetRule(p, h, int64_t(n));
      s.theta[r] = rule.theta;
      s.log_mass[r] = rule.log_mass;
      s.dense[r] = rule.dense;
    }
  }
  for (int64_t x = tid; x < G * kThreads; x += kThreads) s.part_D[x] = s.part_drop[x] = 0.f, s.part_kept[x] = 0;
  __syncthreads();

  bool need_vs = false;  // v̄ sums are needed by a non-dense VMC row
  for (int64_t r = 0; r < G; ++r) need_vs |= p.vmc && !s.dense[r] && s.n[r] > 0;

  // Pass 2, one chunk of kThreads keys at a time: thread tid decides key j = j0 + tid for every
  // head, then threads over (head, d) accumulate the chunk's kept rows and v̄ rows.
  float unions = 0.f;
  for (int64_t j0 = 0; j0 < end; j0 += kThreads) {
    const int64_t j = j0 + tid;
    int any = 0;
    for (int64_t r = 0; r < G; ++r) {
      float w = 0.f, vf = 0.f, add;
      const int64_t h = g * G + r;
      if (j < end && MaskVisible<T>(p, MaskBase(p, b, h, i), j, add)) {
        const float a = Dot(s.q + r * Dh, KvRow<T>(p.past_key, p.k_new, p, geo, b, g, j, Dh), Dh) + add;
        const float mx = s.mx[r];
        const float e = expf(a - mx);
        bool keep;
        if (s.nan[r]) keep = true;                // a NaN row counts every visible key as kept
        else if (mx == -INFINITY) keep = false;   // all scores -inf: nothing kept, even if dense
        else if (s.dense[r]) keep = true;
        else if (p.placement == Placement::kPostSoftmax) keep = e / s.Z[r] > s.theta[r];
        else keep = a > s.theta[r];
        if (keep) {
          w = e;
          s.part_D[r * kThreads + tid] += e;
          s.part_kept[r * kThreads + tid] += 1;
          any = 1;
        } else if (!isnan(e)) {
          s.part_drop[r * kThreads + tid] += e;
        }
        vf = (!p.past_v_sum || j >= geo.past_rows) ? 1.f : 0.f;
      }
      s.w[r * kThreads + tid] = w;
      s.vf[r * kThreads + tid] = vf;
    }
    s.ukeep[tid] = any;
    unions += float(any);
    __syncthreads();
    const int64_t nk = min(int64_t(kThreads), end - j0);
    for (int64_t x = tid; x < G * Dv; x += kThreads) {
      const int64_t r = x / Dv, d = x % Dv;
      // the chunk's sums first, then added to the running ones: rounding grows with the chunk
      // length plus the number of chunks, not with the row length
      float acc = 0.f, vs = 0.f;
      for (int64_t t = 0; t < nk; ++t) {
        const float w = s.w[r * kThreads + t], vf = need_vs ? s.vf[r * kThreads + t] : 0.f;
        if (!s.ukeep[t] && vf == 0.f) continue;
        const float v = ToF<T>(KvRow<T>(p.past_value, p.v_new, p, geo, b, g, j0 + t, Dv)[d]);
        acc += w * v;
        vs += vf * v;
      }
      s.acc[x] += acc;
      s.vs[x] += vs;
    }
    __syncthreads();
  }
  const float union_rows = BlockReduce(unions, s.red, Sum());

  // Output and stats, head by head.
  for (int64_t r = 0; r < G; ++r) {
    const int64_t h = g * G + r;
    const float D = BlockReduce(s.part_D[r * kThreads + tid], s.red, Sum());
    const float dropped = BlockReduce(s.part_drop[r * kThreads + tid], s.red, Sum());
    const float kept = BlockReduce(float(s.part_kept[r * kThreads + tid]), s.red, Sum());
    const int64_t n = s.n[r];
    RowRule rule{s.theta[r], s.log_mass[r], s.dense[r] != 0};
    const OutWeights ow = RowWeights(p, rule, n, int64_t(kept), s.mx[r], s.nan[r] != 0, s.Z[r], D, dropped);
    T* y = static_cast<T*>(p.y) + ((b * p.Hq + h) * p.S + i) * Dv;
    for (int64_t d = tid; d < Dv; d += kThreads) {
      float v;
      if (ow.nan) v = NAN;
      else if (ow.zero) v = 0.f;
      else {
        v = ow.wa * s.acc[r * Dv + d];
        if (ow.wv != 0.f) {
          const float base = p.past_v_sum ? p.past_v_sum[(b * p.Hkv + g) * Dv + d] : 0.f;
          v += ow.wv * (base + s.vs[r * Dv + d]);
        }
      }
      y[d] = FromF<T>(v);
    }
    if (p.stats && tid == 0) {
      unsigned long long* st = reinterpret_cast<unsigned long long*>(p.stats + (b * p.Hq + h) * kNumStats);
      atomicAdd(st + kGroupVRows, (unsigned long long)union_rows);  // every head of the group
    }
    if (p.stats && tid == 0 && n > 0) {
      unsigned long long* st = reinterpret_cast<unsigned long long*>(p.stats + (b * p.Hq + h) * kNumStats);
      atomicAdd(st + kRows, 1ull);
      atomicAdd(st + kVisible, (unsigned long long)n);
      atomicAdd(st + kKept, (unsigned long long)kept);
      if (rule.dense) atomicAdd(st + kDenseRows, 1ull);
      if (p.calibrated_max_length > 0 && n > p.calibrated_max_length) atomicAdd(st + kBeyond, 1ull);
    }
  }
}

}  // namespace

cudaError_t LaunchGeneric(const TopThetaParams& p, cudaStream_t stream) {
  if (p.B == 0 || p.Hkv == 0 || p.S == 0) return cudaSuccess;
  const int64_t G = p.Hq / p.Hkv;
  const size_t smem = SmemBytes(G, p.Dh, p.Dv);
  const dim3 grid(unsigned(p.S), unsigned(p.Hkv), unsigned(p.B));
  auto launch = [&](auto kernel) {
    if (smem > 48 * 1024) {
      const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
      if (err != cudaSuccess) return err;
    }
    kernel<<<grid, kThreads, smem, stream>>>(p);
    return cudaGetLastError();
  };
  switch (p.dtype) {
    case DType::kFloat32: return launch(GenericKernel<float>);
    case DType::kFloat16: return launch(GenericKernel<__half>);
    case DType::kBFloat16: return launch(GenericKernel<__nv_bfloat16>);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda_detail
}  // namespace topt
