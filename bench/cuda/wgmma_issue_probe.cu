// How long does a warpgroup's wgmma issue take, and does the warp run on while its wgmmas execute?
// One CTA per SM (grid = SM count), W warpgroups each issuing n m64n128k16 (or m64n64k16) wgmmas
// with both operands in shared memory, then (optionally) L dependent FFMAs, then waiting for the
// group; %clock before the issue, after the commit, after the FFMAs and after the wait.
// Timing only: the operands are whatever shared memory holds.
// nvcc -O3 -std=c++17 -gencode arch=compute_90a,code=sm_90a bench/cuda/wgmma_issue_probe.cu -o probe && ./probe
// (bench/results/step_h100_session28/wgmma_issue_probe.txt: what it printed on an H100)
#include <cstdio>
#include <cuda_runtime.h>

__device__ __forceinline__ unsigned Clk() { unsigned c; asm volatile("mov.u32 %0, %%clock;" : "=r"(c)::"memory"); return c; }
__device__ __forceinline__ unsigned DescLo(unsigned addr) { return ((addr & 0x3FFFF) >> 4) | (1u << 16); }
constexpr unsigned kDescHi = (1024 >> 4) | (1u << 30);

template <int N>
__device__ __forceinline__ void Wgmma(float (&d)[N / 2], unsigned a, unsigned b);
template <>
__device__ __forceinline__ void Wgmma<128>(float (&d)[64], unsigned a, unsigned b) {
  asm volatile(
      "{\n.reg .b64 da, db;\nmov.b64 da, {%64, %66};\nmov.b64 db, {%65, %66};\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, da, db, 1, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "r"(a), "r"(b), "r"(kDescHi));
}
template <>
__device__ __forceinline__ void Wgmma<64>(float (&d)[32], unsigned a, unsigned b) {
  asm volatile(
      "{\n.reg .b64 da, db;\nmov.b64 da, {%32, %34};\nmov.b64 db, {%33, %34};\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, da, db, 1, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "r"(a), "r"(b), "r"(kDescHi));
}

// out[block][wg][4]: mean cycles (issue, ffma done, wait done) over kReps, and the FFMA result (kept live)
template <int N, int NW, int n>
__global__ void __launch_bounds__(256, 1) Probe(int ffmas, unsigned* out, float* sink) {
  extern __shared__ __align__(1024) unsigned char smem[];
  const unsigned base = unsigned(__cvta_generic_to_shared(smem));
  const int wg = threadIdx.x / 128;
  if (wg >= NW) return;
  float d[N / 2];
#pragma unroll
  for (int i = 0; i < N / 2; ++i) d[i] = 0.f;
  const unsigned da = DescLo(base + wg * 8192), db = DescLo(base + 16384);
  float x = float(threadIdx.x);
  unsigned s_issue = 0, s_ffma = 0, s_wait = 0;
  constexpr int kReps = 64;
  for (int rep = 0; rep < kReps + 4; ++rep) {
    asm volatile("bar.sync %0, 128;\n" ::"r"(1 + wg) : "memory");
    const unsigned t0 = Clk();
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#pragma unroll
    for (int k = 0; k < n; ++k) Wgmma<N>(d, da + (k & 3) * 2, db + (k & 3) * 2);
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
    const unsigned t1 = Clk();
    for (int i = 0; i < ffmas; ++i) x = fmaf(x, 1.0001f, 0.5f);
    asm volatile("" : "+f"(x));
    const unsigned t2 = Clk();
    asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
#pragma unroll
    for (int i = 0; i < N / 2; ++i) asm volatile("" : "+f"(d[i])::"memory");
    const unsigned t3 = Clk();
    if (rep >= 4) s_issue += t1 - t0, s_ffma += t2 - t0, s_wait += t3 - t0;
  }
  float acc = x;
#pragma unroll
  for (int i = 0; i < N / 2; ++i) acc += d[i];
  if (threadIdx.x % 128 == 0) {
    unsigned* o = out + (blockIdx.x * 2 + wg) * 3;
    o[0] = s_issue / kReps, o[1] = s_ffma / kReps, o[2] = s_wait / kReps;
  }
  sink[blockIdx.x * 256 + threadIdx.x] = acc;
}

template <int N, int NW, int n>
void RunN(int sms, unsigned* dout, float* dsink) {
  const int smem = 16384 + 16384 + 1024;
  cudaFuncSetAttribute(Probe<N, NW, n>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  for (int ffmas : {0, 256, 1024}) {
    Probe<N, NW, n><<<sms, 256, smem>>>(ffmas, dout, dsink);
    unsigned h[2 * 132 * 3];
    cudaMemcpy(h, dout, sizeof(unsigned) * 2 * sms * 3, cudaMemcpyDeviceToHost);
    double a[3] = {0, 0, 0};
    for (int b = 0; b < sms; ++b)
      for (int i = 0; i < 3; ++i) a[i] += h[b * 2 * 3 + i];
    std::printf("m64n%dk16 SS, %d warpgroup(s), n = %2d (%4d tensor cycles at peak per warpgroup), %4d FFMAs after the commit: "
                "issue %5.0f, FFMAs done %5.0f, wait done %5.0f cycles (warpgroup 0, mean over SMs)\n",
                N, NW, n, n * N / 2, ffmas, a[0] / sms, a[1] / sms, a[2] / sms);
  }
}
template <int N, int NW>
void Run(int sms, unsigned* dout, float* dsink) {
  RunN<N, NW, 1>(sms, dout, dsink);
  RunN<N, NW, 4>(sms, dout, dsink);
  RunN<N, NW, 8>(sms, dout, dsink);
  RunN<N, NW, 16>(sms, dout, dsink);
}

int main() {
  int sms = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  if (sms > 132) sms = 132;
  unsigned* dout;
  float* dsink;
  cudaMalloc(&dout, sizeof(unsigned) * 2 * 132 * 3);
  cudaMalloc(&dsink, sizeof(float) * 256 * 132);
  Run<128, 1>(sms, dout, dsink);
  Run<128, 2>(sms, dout, dsink);
  Run<64, 1>(sms, dout, dsink);
  Run<64, 2>(sms, dout, dsink);
  const cudaError_t e = cudaDeviceSynchronize();
  std::printf("%s\n", cudaGetErrorString(e));
  return e != cudaSuccess;
}
