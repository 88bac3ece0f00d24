// Prefill (S > 1) on Hopper warpgroup MMAs (wgmma, sm_90a): the one-pass instance of tt_prefill.cu
// (pre_softmax, or every row dense; no mask), float16, Dh = Dv in {64, 128}. Same rule, same
// compensation, same column sums; what changes is the tensor-core work:
// - a CTA of two warpgroups owns 128 query rows of one head; each warpgroup computes its 64 rows ×
//   64 keys of Q·Kᵀ with one m64n64k16 wgmma per 16 dims, Q and K read from shared memory;
// - O += P·V is an m64n(D + 8)k16 wgmma per 16 keys, P from registers (the score fragment is already
//   the A layout), V from shared memory with 8 rows of ones after it: column D of the product is
//   each row's Σ P, the kept sum, in the fp16 values P·V multiplied (their rounding cancels in Y
//   where a few keys dominate a row) and with no adds of its own;
// - K and V are staged once per (b, g) into the workspace (StageKvKernel: one read and one write of
//   each), every 64-key tile as one block holding K and Vᵀ exactly as shared memory wants them
//   (wgmma wants V's keys contiguous; both in the 128-byte swizzle), so that a tile arrives with one
//   bulk copy issued by one thread, not 16 address computations and copies per thread;
// - the P·V of a tile is skipped when no row of the warpgroup keeps a key in it (the skip unit is
//   64 rows × 64 keys, the warpgroup's: wgmma is issued by all four warps together);
// - the tiles come through a 4-stage ring of bulk copies completing on mbarriers; the two
//   warpgroups alternate their wgmma issue (FlashAttention-3's ping-pong), each overlapping tile
//   t + 1's softmax with its P·V(t);
// - the running max moves only when a tile passes it by 2^8 in e (FlashAttention-4's lazy
//   rescale), so O is rarely rescaled.
// Chosen at launch where the device is sm_90 and this file's sm_90a code is the binary that runs
// (PrefillSm90Available); TOPT_CUDA_PREFILL_SM90=0 turns it off.
#include <cuda_fp16.h>

#include <cstdlib>
#include <cstring>

#include "tt_common.cuh"
#include "tt_prefill_rows.cuh"
#include "tt_internal.h"

namespace topt {
namespace cuda_detail {
namespace {

// kStages: tile t + 2 is copied while tile t is computed and t + 1's Q·Kᵀ runs (4 × 32 KB at Dh 128).
constexpr int kRows = 128, kThreads = 256, kStages = 4;  // rows: two warpgroups of 64

// Tiles in shared memory, K-major with the 128-byte swizzle: a block holds rows of 64 halves (128
// bytes), the 16-byte chunk c of row r at chunk position c ^ (r % 8); Dh = 128 is two blocks of
// all rows, side by side. Every tile starts at a multiple of 1024 bytes (the swizzle's period).
// A staged tile (in the workspace and in a ring stage alike): K, then Vᵀ.
template <int D>
struct Sm90Tile {
  __half k[kPfKeys * D];   // [D / 64 blocks][64 keys][64]
  __half vt[(D + 8) * kPfKeys];  // [D rows][64 keys], then 8 rows of ones: P·V's column D is Σ P
};

template <int D>
struct Sm90Smem {
  __half q[kRows * D];  // [D / 64 blocks][128 rows][64]
  Sm90Tile<D> st[kStages];
  float vcol[D];
  float vpart[kThreads];   // v̄'s numerator over the whole tiles: kThreads / D partial sums per column
  uint64_t full[kStages];  // tile arrived: its bulk copy complete (one arrival, with the byte count)
};

// Offset in halves of element (r, c) of a swizzled tile of R rows.
template <int R>
__device__ __forceinline__ int Swz(int r, int c) {
  return (c >> 6) * R * 64 + r * 64 + ((((c >> 3) & 7) ^ (r & 7)) << 3) + (c & 7);
}

// The device helpers exist in the sm_90a pass only (the other passes compile the kernel empty).
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)

// wgmma shared-memory descriptor: K-major, 128-byte swizzle, 8-row groups 1024 bytes apart. Kept
// as its low word (the start address in 16-byte units, the leading offset): offsets are then one
// 32-bit add (the address never carries out of its 14 bits), not three 64-bit ones per wgmma.
__device__ __forceinline__ unsigned DescLo(const __half* p) { return ((SmemAddr(p) & 0x3FFFF) >> 4) | (1u << 16); }
constexpr unsigned kDescHi = (1024 >> 4) | (1u << 30);  // the 8-row group stride; the 128-byte swizzle

__device__ __forceinline__ void WgFence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void WgCommit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>  // until at most N committed groups of this warp are pending
__device__ __forceinline__ void WgWait() { asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory"); }
// cp.async (generic proxy) writes made visible to wgmma's reads (async proxy).
__device__ __forceinline__ void FenceProxyAsync() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
// Keeps the compiler from moving accumulator reads and writes across an issue or a wait.
template <int N>
__device__ __forceinline__ void FenceRegs(float (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}
__device__ __forceinline__ void MbarInit(uint64_t* bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(SmemAddr(bar)), "r"(count) : "memory");
}
// Where `issue`: bar expects `bytes` more and the bulk copy of them from src to dst completes them
// (no branch: a divergent one among the wgmmas makes ptxas serialize them).
__device__ __forceinline__ void BulkCopy(bool issue, void* dst, const void* src, unsigned bytes, uint64_t* bar) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.u32 p, %0, 0;\n"
      "@p mbarrier.arrive.expect_tx.shared::cta.b64 _, [%3], %2;\n"
      "@p cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%1], [%4], %2, [%3];\n}\n"
      ::"r"(unsigned(issue)), "r"(SmemAddr(dst)), "r"(bytes), "r"(SmemAddr(bar)), "l"(src) : "memory");
}
__device__ __forceinline__ void MbarWait(uint64_t* bar, unsigned parity) {
  asm volatile("{\n.reg .pred p;\nWAIT:\nmbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n@!p bra WAIT;\n}\n"
               ::"r"(SmemAddr(bar)), "r"(parity) : "memory");
}
// Named barriers 3 and 4 order the two warpgroups' wgmma issue (FlashAttention-3's ping-pong): a
// warpgroup syncs on its own before issuing and arrives on the other's after, so one warpgroup's
// softmax runs while the other's wgmmas do.
__device__ __forceinline__ void PingPongSync(int wg) { asm volatile("bar.sync %0, 256;\n" ::"r"(3 + wg) : "memory"); }
__device__ __forceinline__ void PingPongArrive(int wg) { asm volatile("bar.arrive %0, 256;\n" ::"r"(4 - wg) : "memory"); }

// OR of v over the warpgroup's 128 threads (named barrier 1 + wg). (Passing it through shared memory
// to the next ping-pong sync instead, with no barrier of its own, was slower: 4.06 -> 4.22 ms on
// 32/8/128 16K; the barrier keeps the warpgroup's warps together for the next wgmma.)
__device__ __forceinline__ bool WgAny(bool v, int wg) {
  unsigned r;
  asm volatile("{\n.reg .pred p, q;\nsetp.ne.u32 p, %1, 0;\nbar.red.or.pred q, %2, 128, p;\nselp.u32 %0, 1, 0, q;\n}\n"
               : "=r"(r) : "r"(unsigned(v)), "r"(1 + wg) : "memory");
  return __shfl_sync(0xffffffffu, r, 0) != 0;  // uniform, and known to be (see wg)
}

// The wgmma forms used (generated: every accumulator register is an operand).
// d (64 × 64, fp32) (+)= A (64 × 16, shared) · B (16 × 64, shared).
__device__ __forceinline__ void WgmmaSS(float (&d)[32], unsigned a, unsigned b, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\n.reg .b64 da, db;\nsetp.ne.b32 p, %34, 0;\nmov.b64 da, {%32, %35};\nmov.b64 db, {%33, %35};\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, da, db, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "r"(a), "r"(b), "r"(accumulate), "r"(kDescHi));
}
// d (64 × N, fp32) += A (64 × 16, registers) · B (16 × N, shared), N = D + 8 for D = 64, 128.
__device__ __forceinline__ void WgmmaRS(float (&d)[36], const unsigned (&a)[4], unsigned b) {
  asm volatile(
      "{\n.reg .pred p;\n.reg .b64 db;\nsetp.ne.b32 p, %41, 0;\nmov.b64 db, {%40, %42};\n"
      "wgmma.mma_async.sync.aligned.m64n72k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35}, {%36, %37, %38, %39}, db, p, 1, 1, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b), "r"(1), "r"(kDescHi));
}
__device__ __forceinline__ void WgmmaRS(float (&d)[68], const unsigned (&a)[4], unsigned b) {
  asm volatile(
      "{\n.reg .pred p;\n.reg .b64 db;\nsetp.ne.b32 p, %73, 0;\nmov.b64 db, {%72, %74};\n"
      "wgmma.mma_async.sync.aligned.m64n136k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67}, {%68, %69, %70, %71}, db, p, 1, 1, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b), "r"(1), "r"(kDescHi));
}

template <int D>
__device__ __forceinline__ void WgmmaPV(float (&acc)[(D + 8) / 2], const unsigned (&a)[4], unsigned b) { WgmmaRS(acc, a, b); }
#endif

// The staged tiles per (b, g): tile t of the keys the buffers can hold at ws[(b·Hkv + g)·T + t],
// K and Vᵀ each in the 128-byte swizzle (zero past the batch's valid keys, so that P = 0 there never
// meets a NaN). The writes are whole 16-byte chunks in the tile's order (coalesced).
template <int D>
__global__ void __launch_bounds__(kThreads) StageKvKernel(TopThetaParams p, Sm90Tile<D>* ws, int64_t T) {
  __shared__ __half tk[kPfKeys][D + 8], tv[kPfKeys][D + 8];
  const int64_t t = blockIdx.x, j0 = t * kPfKeys, bg = blockIdx.y, b = bg / p.Hkv, g = bg % p.Hkv;
  const KvGeom geo = GetGeom(p, b);
  constexpr int C = D / 8;  // 16-byte chunks per row of D
  for (int i = threadIdx.x; i < kPfKeys * C; i += kThreads) {
    const int r = i / C, c = i % C;
    uint4 k = make_uint4(0, 0, 0, 0), v = k;
    if (j0 + r < geo.valid_end) {
      k = reinterpret_cast<const uint4*>(KvRow<__half>(p.past_key, p.k_new, p, geo, b, g, j0 + r, D))[c];
      v = reinterpret_cast<const uint4*>(KvRow<__half>(p.past_value, p.v_new, p, geo, b, g, j0 + r, D))[c];
    }
    *reinterpret_cast<uint4*>(&tk[r][c * 8]) = k;
    *reinterpret_cast<uint4*>(&tv[r][c * 8]) = v;
  }
  __syncthreads();
  Sm90Tile<D>& out = ws[bg * T + t];
  // chunk i of K's tile: block i / 512, key (i / 8) % 64, position i % 8, holding dims 8·(position ^ key % 8)
  for (int i = threadIdx.x; i < kPfKeys * C; i += kThreads) {
    const int r = (i >> 3) & (kPfKeys - 1), c = (i >> 9) * 64 + (((i & 7) ^ (r & 7)) << 3);
    reinterpret_cast<uint4*>(out.k)[i] = *reinterpret_cast<const uint4*>(&tk[r][c]);
  }
  // chunk i of Vᵀ's tile: dim i / 8, position i % 8, holding keys 8·(position ^ dim % 8); the rows
  // of ones after them
  for (int i = D * (kPfKeys / 8) + threadIdx.x; i < (D + 8) * (kPfKeys / 8); i += kThreads)
    reinterpret_cast<uint4*>(out.vt)[i] = make_uint4(0x3C003C00u, 0x3C003C00u, 0x3C003C00u, 0x3C003C00u);
  for (int i = threadIdx.x; i < D * (kPfKeys / 8); i += kThreads) {
    const int d = i >> 3, j = ((i & 7) ^ (d & 7)) << 3;
    __align__(16) __half v[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) v[e] = tv[j + e][d];
    reinterpret_cast<uint4*>(out.vt)[i] = *reinterpret_cast<const uint4*>(v);
  }
}

template <int D>
__global__ void __launch_bounds__(kThreads, 1) PrefillSm90Kernel(TopThetaParams p, const float* colsum, int64_t T, const Sm90Tile<D>* ws) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ unsigned char smem_raw[];
  Sm90Smem<D>& sm = *reinterpret_cast<Sm90Smem<D>*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  constexpr int NA = (D + 8) / 2, kWgRows = 64;  // accumulator floats per thread: 64 rows × (D + 8) over 128 threads
  const int64_t q0 = int64_t(gridDim.x - 1 - blockIdx.x) * kRows;  // causal: the longest rows start first
  const int64_t h = blockIdx.y, b = blockIdx.z, g = h / (p.Hq / p.Hkv), bg = b * p.Hkv + g;
  // wg through a shuffle: the compiler then knows it (and what follows from it) is warp-uniform,
  // else it serializes the wgmmas under every branch on it.
  const int wg = __shfl_sync(0xffffffffu, int(threadIdx.x >> 7), 0), warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31;
  const KvGeom geo = GetGeom(p, b);
  const float scale = p.scale;
  const int64_t wq0 = q0 + wg * kWgRows;  // the warpgroup's first row

  // this thread's two rows (r = 0: lane/4, r = 1: lane/4 + 8 of its warp's 16)
  int64_t row[2], end[2];
  RowRule rule[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    row[r] = wq0 + warp * 16 + (lane >> 2) + 8 * r;
    end[r] = row[r] < p.S ? RowEnd(p, geo, row[r]) : 0;
    rule[r] = GetRule(p, h, end[r]);
  }
  const bool warp_live = wq0 + warp * 16 < p.S;
  // tiles [0, warp_whole): every row of the warp sees them whole
  const int warp_whole = warp_live ? int(RowEnd(p, geo, wq0 + warp * 16) / kPfKeys) : 0;
  const int wg_tiles = wq0 < p.S ? int((RowEnd(p, geo, min(p.S, wq0 + kWgRows) - 1) + kPfKeys - 1) / kPfKeys) : 0;
  const int tiles = int((RowEnd(p, geo, min(p.S, q0 + kRows) - 1) + kPfKeys - 1) / kPfKeys);
  const int full_tiles = int(RowEnd(p, geo, q0) / kPfKeys);  // tiles [0, full_tiles): every row sees them whole

  // Tile t: one bulk copy into its stage, issued by thread 0.
  const Sm90Tile<D>* ws_bg = ws + bg * T;
  auto copy = [&](int t) {
    if (t < tiles) BulkCopy(threadIdx.x == 0, &sm.st[t % kStages], ws_bg + t, unsigned(sizeof(Sm90Tile<D>)), &sm.full[t % kStages]);
  };
  auto wait_tile = [&](int t) { MbarWait(&sm.full[t % kStages], unsigned(t / kStages) & 1u); };

  if (threadIdx.x < kStages) MbarInit(&sm.full[threadIdx.x], 1);
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  __syncthreads();
  // tiles 0 .. kStages - 3, and Q (zeros past S) meanwhile
  for (int t = 0; t < kStages - 2; ++t) copy(t);
  constexpr int kChunks = D / 8;
  const __half* q_bh = static_cast<const __half*>(p.q) + (b * p.Hq + h) * p.S * D;
  for (int x = threadIdx.x; x < kRows * kChunks; x += kThreads) {
    const int r = x / kChunks, c = x % kChunks;
    CpAsync16(sm.q + Swz<kRows>(r, c * 8), (q0 + r < p.S ? q_bh + (q0 + r) * D : q_bh) + c * 8, q0 + r < p.S);
  }
  CpAsyncCommit();
  CpAsyncWait<0>();
  FenceProxyAsync();  // Q, written by cp.async, read by wgmma
  __syncthreads();

  const float sl2 = scale * kLog2e;  // e = 2^(s·sl2 − max·sl2), s = q·k unscaled (scale > 0)
  auto tile_max = [&](const float (&s)[32], int r) {  // over the quad that holds the row (a tree: short chains)
    float m4[4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
      m4[i] = fmaxf(fmaxf(s[i * 8 + 2 * r], s[i * 8 + 2 * r + 1]), fmaxf(s[i * 8 + 4 + 2 * r], s[i * 8 + 5 + 2 * r]));
    float m = fmaxf(fmaxf(m4[0], m4[1]), fmaxf(m4[2], m4[3]));
    m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 1));
    return fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 2));
  };
  float keep_above[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) keep_above[r] = rule[r].dense ? -INFINITY : rule[r].theta / scale;  // a = scale·s > θ

  // Descriptors: a base each, plus constant offsets (16-byte units) for the stage and the k step.
  const unsigned desc_q = DescLo(sm.q + wg * kWgRows * 64), desc_k = DescLo(sm.st[0].k), desc_v = DescLo(sm.st[0].vt);
  constexpr unsigned kStageDesc = sizeof(Sm90Tile<D>) / 16;  // a stage's offset in descriptor units
  // S (the warpgroup's 64 rows × tile t, unscaled) = Q · Kᵀ, issued (not waited for)
  auto issue_qk = [&](int t, float (&s)[32]) {
    const unsigned dk = desc_k + unsigned(t % kStages) * kStageDesc;
    WgFence();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk)
      WgmmaSS(s, desc_q + ((kk >> 2) * kRows * 128 + (kk & 3) * 32) / 16, dk + ((kk >> 2) * kPfKeys * 128 + (kk & 3) * 32) / 16, kk > 0);
    WgCommit();
  };

  float acc[NA], mx[2] = {-INFINITY, -INFINITY}, z[2] = {0.f, 0.f};
  int kept_n[2] = {0, 0};
#pragma unroll
  for (int i = 0; i < NA; ++i) acc[i] = 0.f;
  // Tile t's softmax, its S in s (complete): hide the keys rows do not see; the online max (Z and
  // the kept sum rescaled now, O's factor `fac` kept for later: P·V(t − 1) may still be adding into
  // O); one exp per score; the keep decisions and P(t) into pa. Three warp-uniform paths: every
  // row of the warp keeps every visible key (dense, or θ = -inf: P = e, and the kept sums are Z
  // and n, filled in at the end), some row keeps a key of the tile, or none does (Z alone).
  // Returns whether any row of the warpgroup keeps a key of the tile (else P·V(t) is skipped).
  const bool keep_all[2] = {keep_above[0] == -INFINITY, keep_above[1] == -INFINITY};
  const bool dense_warp = __all_sync(0xffffffffu, keep_all[0] && keep_all[1]);
  float fac[2] = {1.f, 1.f};
  // The running max is a reference, moved only when a tile's max passes it by more than 2^8 in e
  // (FlashAttention-4's lazy rescale): e ≤ 256 meanwhile, P in fp16 and Z in fp32 hold it, and O
  // is rescaled only on the rare moves.
  // mx_up = mx + the slack and mo = mx·sl2 (0 while mx is -inf) change with mx only.
  const float slack = 8.f / sl2;
  float mx_up[2] = {-INFINITY, -INFINITY}, mo[2] = {0.f, 0.f};
  auto softmax_of = [&](const float (&s)[32], unsigned (&pa)[4][4]) {
    float tmax[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      tmax[r] = tile_max(s, r);
      fac[r] = 1.f;
      if (tmax[r] > mx_up[r]) {  // mx = -inf: the first visible tile
        fac[r] = Exp2((mx[r] - tmax[r]) * sl2);  // 0 while mx is -inf: nothing summed yet
        z[r] *= fac[r];
        mx[r] = tmax[r], mx_up[r] = tmax[r] + slack, mo[r] = tmax[r] * sl2;
      }
    }
    // A row keeps a key of the tile iff it keeps the tile's largest (the rule is monotone in s).
    const bool warp_any = __any_sync(0xffffffffu, tmax[0] > keep_above[0] || tmax[1] > keep_above[1]);
    // a row's 16 values of e, summed as a tree (short chains)
    auto row_sum = [](const float (&e)[32], int r) {
      float q[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) q[i] = (e[i * 8 + 2 * r] + e[i * 8 + 2 * r + 1]) + (e[i * 8 + 4 + 2 * r] + e[i * 8 + 5 + 2 * r]);
      return (q[0] + q[1]) + (q[2] + q[3]);
    };
    if (dense_warp) {
      float e[32];
#pragma unroll
      for (int x = 0; x < 32; ++x) e[x] = Exp2(fmaf(s[x], sl2, -mo[(x >> 1) & 1]));  // 0 where not visible
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) PackA(pa, nt, {e[nt * 4], e[nt * 4 + 1], e[nt * 4 + 2], e[nt * 4 + 3]});
    } else if (warp_any) {
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
        float w[4];
#pragma unroll
        for (int x = 0; x < 4; ++x) {
          const int r = x >> 1;
          const bool k = s[nt * 4 + x] > keep_above[r];
          const float e = Exp2(fmaf(s[nt * 4 + x], sl2, -mo[r]));
          z[r] += e;
          w[x] = k ? e : 0.f;
          kept_n[r] += k;
        }
        PackA(pa, nt, w);
      }
    } else {
      float e[32];
#pragma unroll
      for (int x = 0; x < 32; ++x) e[x] = Exp2(fmaf(s[x], sl2, -mo[(x >> 1) & 1]));
      z[0] += row_sum(e, 0), z[1] += row_sum(e, 1);
#pragma unroll
      for (int i = 0; i < 16; ++i) pa[i >> 2][i & 3] = 0u;
    }
    return WgAny(warp_any, wg);
  };
  auto softmax = [&](int t, const float (&acc_s)[32], unsigned (&pa)[4][4]) {
    if (t < warp_whole) return softmax_of(acc_s, pa);
    const int64_t j0 = int64_t(t) * kPfKeys;
    // -inf where a row does not see the key, in a copy: writing the wgmma's accumulator registers
    // while P·V(t − 1) runs would serialize the wgmmas
    float s[32];
    const int lim[2] = {int(max(int64_t(0), min(int64_t(kPfKeys), end[0] - j0))), int(max(int64_t(0), min(int64_t(kPfKeys), end[1] - j0)))};
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int x = 0; x < 4; ++x) s[nt * 4 + x] = nt * 8 + 2 * (lane & 3) + (x & 1) >= lim[x >> 1] ? -INFINITY : acc_s[nt * 4 + x];
    return softmax_of(s, pa);
  };

  const bool vbar = colsum != nullptr;  // v̄ has weight somewhere
  if (vbar) {  // the column sums of the whole tiles, loaded while the first tiles arrive
    constexpr int kParts = kThreads / D;
    const int d = threadIdx.x % D, part = threadIdx.x / D, n = int(min(int64_t(full_tiles), T));
    const float* cs = colsum + bg * T * D + d;
    float a[4] = {0.f, 0.f, 0.f, 0.f};
    int t = part;
    for (; t + 3 * kParts < n; t += 4 * kParts)
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] += cs[(t + i * kParts) * D];
    for (; t < n; t += kParts) a[0] += cs[t * D];
    sm.vpart[threadIdx.x] = (a[0] + a[1]) + (a[2] + a[3]);
  }

  // The pipeline, as FlashAttention-3's: per warpgroup, with P(t) ready, issue Q·Kᵀ(t + 1) and
  // P·V(t) back to back, wait for Q·Kᵀ(t + 1), run tile t + 1's softmax while P·V(t) runs, then
  // rescale O if the max moved; between the two warpgroups, the ping-pong barriers alternate the
  // wgmma issue, so that one's softmax runs while the other's wgmmas do. P alternates between two
  // register sets (a wgmma reads its A registers until it completes). Tiles arrive on the stages'
  // mbarriers (no CTA-wide barrier in the loop: it would undo the ping-pong). Stage reuse: tile
  // t + kStages - 2 is copied into tile t - 2's stage after the ping-pong sync of iteration t,
  // which comes after the other warpgroup began its iteration t - 1, so both finished their
  // P·V(t - 2). Both warpgroups run every iteration (a finished one only keeps the alternation
  // and the copies).
  float s[32];
  unsigned pa0[4][4], pa1[4][4];
  bool pv = false;  // P(t) keeps something in the warpgroup: issue P·V(t)
  if (wg_tiles > 0) {
    wait_tile(0);
    issue_qk(0, s);
    WgWait<0>();
    FenceRegs(s);
    pv = softmax(0, s, pa0);
    fac[0] = fac[1] = 1.f;  // O is still zero
  }
  if (wg == 1) PingPongArrive(wg);  // warpgroup 0 issues first
  auto step = [&](int t, unsigned (&pa)[4][4], unsigned (&pa_next)[4][4]) {
    const bool live = t < wg_tiles, next = t + 1 < wg_tiles;
    if (next) wait_tile(t + 1);
    PingPongSync(wg);
    if (next) issue_qk(t + 1, s);
    if (live && pv) {
      const unsigned dv = desc_v + unsigned(t % kStages) * kStageDesc;
      WgFence();
#pragma unroll
      for (int kc = 0; kc < 4; ++kc) WgmmaPV<D>(acc, pa[kc], dv + kc * 2);
    }
    // Commits and waits unconditional (a group may be empty; nothing may be pending): under a
    // branch ptxas serializes every wgmma.
    WgCommit();
    PingPongArrive(wg);
    copy(t + kStages - 2);
    WgWait<1>();  // Q·Kᵀ(t + 1) (P·V(t) runs on)
    FenceRegs(s);
    if (next) pv = softmax(t + 1, s, pa_next);
    WgWait<0>();  // P·V(t)
    // O's rescale by tile t + 1's factor, on the rare moves of the max; here, with no wgmma in
    // flight (a branch on it before an issue serializes the wgmmas)
    if (__any_sync(0xffffffffu, fac[0] != 1.f || fac[1] != 1.f)) {
      FenceRegs(acc);
#pragma unroll
      for (int nd = 0; nd < NA / 4; ++nd) acc[nd * 4] *= fac[0], acc[nd * 4 + 1] *= fac[0], acc[nd * 4 + 2] *= fac[1], acc[nd * 4 + 3] *= fac[1];
      FenceRegs(acc);
      fac[0] = fac[1] = 1.f;
    }
  };
  for (int t = 0; t < tiles; t += 2) {  // unrolled by two: P alternates between pa0 and pa1
    step(t, pa0, pa1);
    if (t + 1 < tiles) step(t + 1, pa1, pa0);
  }
  if (wg == 0) PingPongSync(wg);  // warpgroup 1's last arrival
  FenceRegs(acc);
  CpAsyncWait<0>();
  __syncthreads();

  if (vbar && threadIdx.x < D) {
    float sum = 0.f;
#pragma unroll
    for (int part = 0; part < kThreads / D; ++part) sum += sm.vpart[part * D + threadIdx.x];
    sm.vcol[threadIdx.x] = sum;
  }
  // v̄'s numerator of the tiles some rows see in part: Vᵀ once more, times the 0/1 visibility
  float vis[NA];
#pragma unroll
  for (int i = 0; i < NA; ++i) vis[i] = 0.f;
  FenceProxyAsync();  // the ring's bulk copies and wgmma reads before stage 0's rewrite below
  if (vbar)
    for (int t = full_tiles; t < tiles; ++t) {
      for (int i = threadIdx.x; i < (D + 8) * kPfKeys / 8; i += kThreads) CpAsync16(SmemAddr(sm.st[0].vt + i * 8), ws_bg[t].vt + i * 8);
      CpAsyncCommit();
      CpAsyncWait<0>();
      FenceProxyAsync();
      __syncthreads();
      if (t < wg_tiles) {
        unsigned va[4][4];
        VisibilityFragments(va, int64_t(t) * kPfKeys, lane, end);
        WgFence();
#pragma unroll
        for (int kc = 0; kc < 4; ++kc) WgmmaPV<D>(vis, va[kc], desc_v + kc * 2);
        WgCommit();
        WgWait<0>();
        FenceRegs(vis);
      }
      __syncthreads();
    }
  __syncthreads();  // vcol complete

  // Y (a warp whose rows keep every visible key summed no kept sums in the loop)
  // The kept sums from P·V's column D (Σ P over the keys it multiplied, in fp16 as they were: their
  // rounding cancels in Y where a few keys dominate a row), a quarter per lane of the quad; a dense
  // warp's Z is that sum too.
  float kept_e[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    kept_e[r] = 0.25f * acc[(D / 8) * 4 + 2 * r];
    if (dense_warp) z[r] = kept_e[r];
  }
  WriteRowsY<D>(p, b, h, lane, row, end, rule, kept_e, kept_n, z, true, dense_warp, mx, scale,
                [&](int nd, int r, int e) { return acc[nd * 4 + 2 * r + e]; },
                [&](int nd, int r, int e) { return vbar ? sm.vcol[nd * 8 + 2 * (lane & 3) + e] + vis[nd * 4 + 2 * r + e] : 0.f; });
#else
  __trap();  // not built for sm_90a: PrefillSm90Available never picks this
#endif
}

template <int D>
cudaError_t LaunchD(const TopThetaParams& p, const float* colsum, int64_t T, void* ws_raw, cudaStream_t stream) {
  Sm90Tile<D>* ws = static_cast<Sm90Tile<D>*>(ws_raw);
  if (T > 0) {
    StageKvKernel<D><<<dim3(unsigned(T), unsigned(p.B * p.Hkv)), kThreads, 0, stream>>>(p, ws, T);
    if (const cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
  }
  const int smem = int(sizeof(Sm90Smem<D>)) + 1024;  // + the alignment to 1024
  static bool attr_set = false;
  if (!attr_set) {
    const cudaError_t e = cudaFuncSetAttribute(PrefillSm90Kernel<D>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (e != cudaSuccess) return e;
    attr_set = true;
  }
  const dim3 grid(unsigned((p.S + kRows - 1) / kRows), unsigned(p.Hq), unsigned(p.B));
  PrefillSm90Kernel<D><<<grid, kThreads, smem, stream>>>(p, colsum, T, ws);
  return cudaGetLastError();
}

// The device is sm_90 and runs this file's sm_90a code (not a JIT of the portable PTX).
bool DeviceRunsSm90a() {
  int dev = 0, major = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess)
    return false;
  cudaFuncAttributes fa{};
  return major == 9 && cudaFuncGetAttributes(&fa, PrefillSm90Kernel<128>) == cudaSuccess && fa.binaryVersion == 90;
}

}  // namespace

bool PrefillSm90Available() {
  static const bool off = [] { const char* e = std::getenv("TOPT_CUDA_PREFILL_SM90"); return e && std::strcmp(e, "0") == 0; }();
  if (off) return false;
  static int cached[64];  // per device: 0 unknown, 1 yes, 2 no
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return false;
  if (cached[dev] == 0) cached[dev] = DeviceRunsSm90a() ? 1 : 2;
  return cached[dev] == 1;
}

int64_t PrefillSm90StagedBytes(const TopThetaParams& p, int64_t T) {
  return p.B * p.Hkv * T * int64_t(p.Dh == 64 ? sizeof(Sm90Tile<64>) : sizeof(Sm90Tile<128>));
}

cudaError_t LaunchPrefillSm90(const TopThetaParams& p, const float* colsum, int64_t T, void* staged, cudaStream_t stream) {
  return p.Dh == 64 ? LaunchD<64>(p, colsum, T, staged, stream) : LaunchD<128>(p, colsum, T, staged, stream);
}

}  // namespace cuda_detail
}  // namespace topt
