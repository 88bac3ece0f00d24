// MUFU.EX2 throughput: f32 vs f16x2 vs bf16x2 (results per second)
#include <cstdio>
#include <cuda_fp16.h>
template <int MODE>
__global__ void K(float* out, int iters) {
  unsigned v[16];
  float f[16];
  for (int i = 0; i < 16; ++i) { f[i] = -0.001f * (threadIdx.x + i); v[i] = 0xBC00BC00u ^ (threadIdx.x * 7 + i); }
  for (int it = 0; it < iters; ++it) {
#pragma unroll
    for (int i = 0; i < 16; ++i) {
      if (MODE == 0) { asm volatile("ex2.approx.ftz.f32 %0, %0;" : "+f"(f[i])); }
      if (MODE == 1) { asm volatile("ex2.approx.f16x2 %0, %0;" : "+r"(v[i])); }
      if (MODE == 2) { asm volatile("ex2.approx.ftz.bf16x2 %0, %0;" : "+r"(v[i])); }
    }
  }
  float s = 0;
  for (int i = 0; i < 16; ++i) s += f[i] + __uint_as_float(v[i]);
  if (s == 12345.f) out[0] = s;
}
int main() {
  float* out; cudaMalloc(&out, 4);
  cudaEvent_t a, b; cudaEventCreate(&a); cudaEventCreate(&b);
  const int iters = 4096, blocks = 132 * 8, threads = 256;
  for (int mode = 0; mode < 3; ++mode) for (int rep = 0; rep < 3; ++rep) {
    cudaEventRecord(a);
    if (mode == 0) K<0><<<blocks, threads>>>(out, iters);
    if (mode == 1) K<1><<<blocks, threads>>>(out, iters);
    if (mode == 2) K<2><<<blocks, threads>>>(out, iters);
    cudaEventRecord(b); cudaEventSynchronize(b);
    float ms; cudaEventElapsedTime(&ms, a, b);
    double insts = double(blocks) * threads * iters * 16;
    double results = insts * (mode == 0 ? 1 : 2);
    printf("mode %d (%s): %.3f ms, %.1f G instr/s, %.1f G exps/s, per SM per clk(1.98GHz): %.2f lanes-instr\n", mode,
           mode == 0 ? "f32" : mode == 1 ? "f16x2" : "bf16x2", ms, insts / ms / 1e6, results / ms / 1e6, insts / (ms * 1e-3) / 132 / 1.98e9);
  }
  printf("err %s\n", cudaGetErrorString(cudaGetLastError()));
}
