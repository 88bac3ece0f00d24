// Prefill (S > 1) on Hopper warpgroup MMAs (wgmma, sm_90a): the one-pass instance of tt_prefill.cu
// (pre_softmax, or every row dense; no mask), float16, Dh = Dv in {64, 128}. Same rule, same
// compensation, same column sums; what changes is the tensor-core work:
// - a CTA of two warpgroups owns 128 query rows of one head; a tile is 128 keys: each warpgroup
//   computes its 64 rows × 128 keys of Q·Kᵀ with one m64n128k16 wgmma per 16 dims, Q and K read
//   from shared memory (128-key tiles halve the per-tile cost of barriers, waits and votes per key);
// - O += P·V is an m64nDk16 wgmma per 16 keys, P from registers (the score fragment is already the
//   A layout), V from shared memory; beside it P·1 (an m64n8k16 wgmma against a tile of ones) gives
//   each row's Σ P, the kept sum, in the fp16 values P·V multiplied (their rounding cancels in Y
//   where a few keys dominate a row);
// - K and V are staged once per (b, g) into the workspace (StageKvKernel: one read and one write of
//   each), every 128-key tile as K then Vᵀ exactly as shared memory wants them (wgmma wants V's
//   keys contiguous; both in the 128-byte swizzle), so that each arrives with one bulk copy issued
//   by one thread;
// - the P·V of each 64-key half of a tile is skipped when no row of the warpgroup keeps a key in it
//   (the skip unit is 64 rows × 64 keys: wgmma is issued by all four warps together);
// - K and V come through a 3-stage ring: K of tile t + 2 and V of t + 1 are copied (on one
//   barrier) once both warpgroups are past Q·Kᵀ(t − 1) and P·V(t − 2); the two warpgroups
//   alternate their wgmma issue (FlashAttention-3's ping-pong): one's softmax runs while the
//   other's wgmmas do;
// - the running max moves only when a tile passes it by 2^8 in e (FlashAttention-4's lazy
//   rescale), so O is rarely rescaled.
// Chosen at launch where the device is sm_90 and this file's sm_90a code is the binary that runs
// (PrefillSm90Available); TOPT_CUDA_PREFILL_SM90=0 turns it off.
#include <cuda_fp16.h>

#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "tt_common.cuh"
#include "tt_prefill_rows.cuh"
#include "tt_internal.h"

namespace topt {
namespace cuda_detail {
namespace {

// kKeys per tile; kStages: K of tile t + 2 and V of t + 1 are copied while t's P·V and t + 1's Q·Kᵀ
// run (3 × 64 KB at Dh 128, with Q the most shared memory a CTA can have).
constexpr int kRows = 128, kThreads = 256, kStages = 3, kKeys = 2 * kPfKeys;  // rows: two warpgroups of 64

// Tiles in shared memory, K-major with the 128-byte swizzle: a block holds rows of 64 halves (128
// bytes), the 16-byte chunk c of row r at chunk position c ^ (r % 8); Dh = 128 is two blocks of
// all rows, side by side. Every tile starts at a multiple of 1024 bytes (the swizzle's period).
// A staged tile (in the workspace and in a ring stage alike): K, then Vᵀ.
template <int D>
struct Sm90Tile {
  __half k[kKeys * D];   // [D / 64 blocks][128 keys][64]
  __half vt[D * kKeys];  // [2 halves of 64 keys][D rows][64 keys]
};

template <int D>
struct Sm90Smem {
  __half q[kRows * D];  // [D / 64 blocks][128 rows][64]
  Sm90Tile<D> st[kStages];
  __half ones[8 * 64];  // B of P·1: 8 rows of 64 ones
  // bundle[b % kStages]: step b's copies (K of tile b + 1, V of tile b) arrived; k0: K of tile 0
  // (one arrival each, with the byte count)
  uint64_t bundle[kStages], k0;
};

// Offset in halves of element (r, c) of a swizzled tile of R rows.
template <int R>
__device__ __forceinline__ int Swz(int r, int c) {
  return (c >> 6) * R * 64 + r * 64 + ((((c >> 3) & 7) ^ (r & 7)) << 3) + (c & 7);
}

// The device helpers exist in the sm_90a pass only (the other passes compile the kernel empty).
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)

// P·V's A fragment of keys 8·nt .. 8·nt + 7 (nt < 16) from this thread's four values of them.
__device__ __forceinline__ void PackA8(unsigned (&pa)[8][4], int nt, float a, float b, float c, float d) {
  pa[nt >> 1][2 * (nt & 1)] = Pack(a, b);
  pa[nt >> 1][2 * (nt & 1) + 1] = Pack(c, d);
}

// wgmma shared-memory descriptor: K-major, 128-byte swizzle, 8-row groups 1024 bytes apart. Kept
// as its low word (the start address in 16-byte units, the leading offset): offsets are then one
// 32-bit add (the address never carries out of its 14 bits), not three 64-bit ones per wgmma.
__device__ __forceinline__ unsigned DescLo(unsigned addr) { return ((addr & 0x3FFFF) >> 4) | (1u << 16); }
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
// Where `issue`: bar expects `bytes` more (its one arrival), which bulk copies then complete
// (predicated, no branch: a divergent one among the wgmmas makes ptxas serialize them).
__device__ __forceinline__ void MbarExpect(bool issue, unsigned bar, unsigned bytes) {
  asm volatile("{\n.reg .pred p;\nsetp.ne.u32 p, %0, 0;\n@p mbarrier.arrive.expect_tx.shared::cta.b64 _, [%1], %2;\n}\n"
               ::"r"(unsigned(issue)), "r"(bar), "r"(bytes) : "memory");
}
// Where `issue`: the bulk copy of `bytes` from src to dst, completing them on bar.
__device__ __forceinline__ void BulkCopy(bool issue, unsigned dst, const void* src, unsigned bytes, unsigned bar) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.u32 p, %0, 0;\n"
      "@p cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%1], [%4], %2, [%3];\n}\n"
      ::"r"(unsigned(issue)), "r"(dst), "r"(bytes), "r"(bar), "l"(src) : "memory");
}
__device__ __forceinline__ void MbarWait(unsigned bar, unsigned parity) {
  asm volatile("{\n.reg .pred p;\nWAIT:\nmbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n@!p bra WAIT;\n}\n"
               ::"r"(bar), "r"(parity) : "memory");
}
// Named barriers 3 and 4 order the two warpgroups' wgmma issue (FlashAttention-3's ping-pong): a
// warpgroup syncs on its own before issuing and arrives on the other's after, so one warpgroup's
// softmax runs while the other's wgmmas do.
// (The barrier ids are immediates under a branch on wg: held in registers, they were spilled.)
__device__ __forceinline__ void PingPongSync(int wg) {
  if (wg == 0) asm volatile("bar.sync 3, 256;\n" ::: "memory");
  else asm volatile("bar.sync 4, 256;\n" ::: "memory");
}
__device__ __forceinline__ void PingPongArrive(int wg) {
  if (wg == 0) asm volatile("bar.arrive 4, 256;\n" ::: "memory");
  else asm volatile("bar.arrive 3, 256;\n" ::: "memory");
}

// Named barriers 5 and 6 make the two warpgroups take turns at their softmax's exps (Dh 64 only: the
// exps share the SFU, and with Dh 64's short GEMMs the two softmaxes would otherwise run at once;
// 9/3/64 16K 4-6% faster with most tiles empty; 32/8/128 2% slower, so it does not take turns).
// Ids in registers: there is room at Dh 64.
__device__ __forceinline__ void ExpsTurnWait(int wg) { asm volatile("bar.sync %0, 256;\n" ::"r"(5 + wg) : "memory"); }
__device__ __forceinline__ void ExpsTurnPass(int wg) { asm volatile("bar.arrive %0, 256;\n" ::"r"(6 - wg) : "memory"); }

// ORs of v0 and v1 over the warpgroup's 128 threads (named barrier 1 + wg), as bits 0 and 1.
// (Passing an OR through shared memory to the next ping-pong sync instead, with no barrier of its
// own, was slower: 4.06 -> 4.22 ms on 32/8/128 16K; the barrier keeps the warpgroup's warps
// together for the next wgmma. One bar.red.popc counting v0 on lane 0 and v1 on lanes 1..8 was
// slower than the two bar.red.or: 3.46 -> 3.50 ms at 88% of the tiles empty.)
__device__ __forceinline__ int WgAny2(bool v0, bool v1, int wg) {
  unsigned r;
  asm volatile(
      "{\n.reg .pred p, q;\n.reg .u32 a, b;\nsetp.ne.u32 p, %1, 0;\nbar.red.or.pred q, %3, 128, p;\nselp.u32 a, 1, 0, q;\n"
      "setp.ne.u32 p, %2, 0;\nbar.red.or.pred q, %3, 128, p;\nselp.u32 b, 2, 0, q;\nor.b32 %0, a, b;\n}\n"
      : "=r"(r) : "r"(unsigned(v0)), "r"(unsigned(v1)), "r"(1 + wg) : "memory");
  return __shfl_sync(0xffffffffu, int(r), 0);  // uniform, and known to be (a branch on it among the wgmmas must be)
}

// The wgmma forms used (generated: every accumulator register is an operand).
// d (64 × 128, fp32) (+)= A (64 × 16, shared) · B (16 × 128, shared).
__device__ __forceinline__ void WgmmaSS(float (&d)[64], unsigned a, unsigned b, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\n.reg .b64 da, db;\nsetp.ne.b32 p, %66, 0;\nmov.b64 da, {%64, %67};\nmov.b64 db, {%65, %67};\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, da, db, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "r"(a), "r"(b), "r"(accumulate), "r"(kDescHi));
}
// d (64 × N, fp32) += A (64 × 16, registers) · B (16 × N, shared), N = 128, 64 (P·V) and 8 (P·1).
__device__ __forceinline__ void WgmmaRS(float (&d)[64], const unsigned (&a)[4], unsigned b) {
  asm volatile(
      "{\n.reg .pred p;\n.reg .b64 db;\nsetp.ne.b32 p, %69, 0;\nmov.b64 db, {%68, %70};\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, db, p, 1, 1, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b), "r"(1), "r"(kDescHi));
}
__device__ __forceinline__ void WgmmaRS(float (&d)[32], const unsigned (&a)[4], unsigned b) {
  asm volatile(
      "{\n.reg .pred p;\n.reg .b64 db;\nsetp.ne.b32 p, %37, 0;\nmov.b64 db, {%36, %38};\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, %35}, db, p, 1, 1, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b), "r"(1), "r"(kDescHi));
}
__device__ __forceinline__ void WgmmaRS(float (&d)[4], const unsigned (&a)[4], unsigned b) {
  asm volatile(
      "{\n.reg .pred p;\n.reg .b64 db;\nsetp.ne.b32 p, %9, 0;\nmov.b64 db, {%8, %10};\n"
      "wgmma.mma_async.sync.aligned.m64n8k16.f32.f16.f16 {%0, %1, %2, %3}, {%4, %5, %6, %7}, db, p, 1, 1, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b), "r"(1), "r"(kDescHi));
}

#endif

// The staged tiles per (b, g): the 128-key tile t of the keys the buffers can hold at
// ws[(b·Hkv + g)·T2 + t], K and Vᵀ each in the 128-byte swizzle (zero past the batch's valid keys,
// so that P = 0 there never meets a NaN). A CTA stages one 64-key half (h = blockIdx.x % 2) of a
// tile; its writes are whole 16-byte chunks in the tile's order (coalesced).
template <int D>
__global__ void __launch_bounds__(kThreads) StageKvKernel(TopThetaParams p, Sm90Tile<D>* ws, int64_t T2) {
  __shared__ __half tk[kPfKeys][D + 8], tv[kPfKeys][D + 8];
  const int64_t j0 = int64_t(blockIdx.x) * kPfKeys, bg = blockIdx.y, b = bg / p.Hkv, g = bg % p.Hkv;
  const int half = blockIdx.x & 1;
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
  Sm90Tile<D>& out = ws[bg * T2 + (blockIdx.x >> 1)];
  // chunk i of this half of K: block i / 512, key (i / 8) % 64 of the half, position i % 8, holding
  // dims 8·(position ^ key % 8); a block is the tile's 128 keys, this half's 64 after the other's
  for (int i = threadIdx.x; i < kPfKeys * C; i += kThreads) {
    const int r = (i >> 3) & (kPfKeys - 1), c = (i >> 9) * 64 + (((i & 7) ^ (r & 7)) << 3);
    reinterpret_cast<uint4*>(out.k)[(i >> 9) * (kKeys * 8) + half * (kPfKeys * 8) + (i & 511)] = *reinterpret_cast<const uint4*>(&tk[r][c]);
  }
  // chunk i of this half of Vᵀ: dim i / 8, position i % 8, holding keys 8·(position ^ dim % 8)
  for (int i = threadIdx.x; i < D * (kPfKeys / 8); i += kThreads) {
    const int d = i >> 3, j = ((i & 7) ^ (d & 7)) << 3;
    __align__(16) __half v[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) v[e] = tv[j + e][d];
    reinterpret_cast<uint4*>(out.vt)[half * D * (kPfKeys / 8) + i] = *reinterpret_cast<const uint4*>(v);
  }
}

// T: the 64-key column-sum tiles of colsum; the staged tiles are T2 = ⌈T / 2⌉ of 128 keys.
template <int D>
__global__ void __launch_bounds__(kThreads, 1) PrefillSm90Kernel(TopThetaParams p, const float* colsum, int64_t T, const Sm90Tile<D>* ws) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  // Aligned to 1024 (the swizzle's period) by its declaration, not at run time: every shared address
  // is then a constant offset, not a computation from the generic pointer that ptxas redoes at each use.
  // The shared addresses are taken from one base held in a register (opaque to ptxas, which would
  // otherwise redo the generic-to-shared conversion at every use).
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  Sm90Smem<D>& sm = *reinterpret_cast<Sm90Smem<D>*>(smem_raw);
  unsigned smem_base = SmemAddr(smem_raw);
  asm volatile("" : "+r"(smem_base));
  if (smem_base & 1023u) __trap();
  auto sa = [&](const void* p) { return smem_base + unsigned(static_cast<const unsigned char*>(p) - smem_raw); };
  constexpr int NA = D / 2, kWgRows = 64;  // O's floats per thread: 64 rows × D over 128 threads
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
  // tiles [0, wg_whole): every row of the warpgroup sees them whole (the softmax's masked path is
  // taken by the warpgroup together: ptxas serializes the wgmmas when P's registers are written on
  // paths the warps of a warpgroup may take apart)
  const int wg_whole = wq0 < p.S ? int(RowEnd(p, geo, wq0) / kKeys) : 0;
  const int wg_tiles = wq0 < p.S ? int((RowEnd(p, geo, min(p.S, wq0 + kWgRows) - 1) + kKeys - 1) / kKeys) : 0;
  const int64_t key_end = RowEnd(p, geo, min(p.S, q0 + kRows) - 1);
  const int tiles = int((key_end + kKeys - 1) / kKeys);
  // v̄'s 64-key column-sum tiles: [0, full_tiles) every row sees whole, [full_tiles, cs_tiles) some row sees
  const int full_tiles = int(RowEnd(p, geo, q0) / kPfKeys), cs_tiles = int((key_end + kPfKeys - 1) / kPfKeys);

  // Tile t's K and V go into stage t % kStages (passed in: counters, not divisions, track it), each
  // with one bulk copy issued by thread 0. Step b's (b < tiles) are a bundle on one barrier: K of
  // tile b + 1 (where it exists) and V of tile b, so that step b waits once (a wait costs ~100
  // cycles even on a complete phase; two waits per step: 32/8/128 16K 1.5-3% slower, 9/3/64 5-8%).
  const Sm90Tile<D>* ws_bg = ws + bg * ((T + 1) / 2);
  auto next_stage = [](int stage) { return stage == kStages - 1 ? 0 : stage + 1; };
  auto copy_bundle = [&](int b, int bstage) {
    if (b >= tiles) return;
    const bool k1 = b + 1 < tiles;
    const unsigned bar = sa(&sm.bundle[bstage]);
    MbarExpect(threadIdx.x == 0, bar, unsigned(sizeof(ws_bg->vt)) + (k1 ? unsigned(sizeof(ws_bg->k)) : 0u));
    if (k1) BulkCopy(threadIdx.x == 0, sa(sm.st[next_stage(bstage)].k), ws_bg[b + 1].k, unsigned(sizeof(ws_bg->k)), bar);
    BulkCopy(threadIdx.x == 0, sa(sm.st[bstage].vt), ws_bg[b].vt, unsigned(sizeof(ws_bg->vt)), bar);
  };

  if (threadIdx.x < kStages) MbarInit(&sm.bundle[threadIdx.x], 1);
  if (threadIdx.x == kStages) MbarInit(&sm.k0, 1);
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  __syncthreads();
  // K of tile 0, bundle 0 (K of tile 1, V of tile 0); Q (zeros past S) and the ones meanwhile
  if (tiles > 0) {
    MbarExpect(threadIdx.x == 0, sa(&sm.k0), unsigned(sizeof(ws_bg->k)));
    BulkCopy(threadIdx.x == 0, sa(sm.st[0].k), ws_bg[0].k, unsigned(sizeof(ws_bg->k)), sa(&sm.k0));
  }
  copy_bundle(0, 0);
  constexpr int kChunks = D / 8;
  const __half* q_bh = static_cast<const __half*>(p.q) + (b * p.Hq + h) * p.S * D;
  for (int x = threadIdx.x; x < kRows * kChunks; x += kThreads) {
    const int r = x / kChunks, c = x % kChunks;
    CpAsync16(sm.q + Swz<kRows>(r, c * 8), (q0 + r < p.S ? q_bh + (q0 + r) * D : q_bh) + c * 8, q0 + r < p.S);
  }
  CpAsyncCommit();
  if (threadIdx.x < 8 * 64 / 8) reinterpret_cast<uint4*>(sm.ones)[threadIdx.x] = make_uint4(0x3C003C00u, 0x3C003C00u, 0x3C003C00u, 0x3C003C00u);
  CpAsyncWait<0>();
  FenceProxyAsync();  // Q and the ones, written by cp.async and st.shared, read by wgmma
  __syncthreads();

  const float sl2 = scale * kLog2e;  // e = 2^(s·sl2 − max·sl2), s = q·k unscaled (scale > 0)
  float keep_above[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) keep_above[r] = rule[r].dense ? -INFINITY : rule[r].theta / scale;  // a = scale·s > θ

  // Descriptors: a base each, plus constant offsets (16-byte units) for the stage, the half and the k step.
  const unsigned desc_q = DescLo(sa(sm.q + wg * kWgRows * 64)), desc_k = DescLo(sa(sm.st[0].k)), desc_v = DescLo(sa(sm.st[0].vt));
  const unsigned desc_ones = DescLo(sa(sm.ones));
  constexpr unsigned kStageDesc = sizeof(Sm90Tile<D>) / 16, kHalfDesc = D * kPfKeys * 2 / 16;
  // S (the warpgroup's 64 rows × tile t, unscaled) = Q · Kᵀ, issued (not waited for)
  auto issue_qk = [&](int stage, float (&s)[64]) {
    const unsigned dk = desc_k + unsigned(stage) * kStageDesc;
    WgFence();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk)
      WgmmaSS(s, desc_q + ((kk >> 2) * kRows * 128 + (kk & 3) * 32) / 16, dk + ((kk >> 2) * kKeys * 128 + (kk & 3) * 32) / 16, kk > 0);
    WgCommit();
  };

  float acc[NA], ksum[4] = {0.f, 0.f, 0.f, 0.f}, mx[2] = {-INFINITY, -INFINITY}, z[2] = {0.f, 0.f};
  int kept_n[2] = {0, 0};
#pragma unroll
  for (int i = 0; i < NA; ++i) acc[i] = 0.f;
  const bool keep_all[2] = {keep_above[0] == -INFINITY, keep_above[1] == -INFINITY};
  const bool dense_warp = __all_sync(0xffffffffu, keep_all[0] && keep_all[1]);
  // The running max is a reference, moved only when a tile's max passes it by more than 2^8 in e
  // (FlashAttention-4's lazy rescale): e ≤ 256 meanwhile, P in fp16 and Z in fp32 hold it, and O
  // is rescaled only on the rare moves.
  // mx_up = mx + the slack and mo = mx·sl2 (0 while mx is -inf) change with mx only.
  const float slack = 8.f / sl2;
  float mx_up[2] = {-INFINITY, -INFINITY}, mo[2] = {0.f, 0.f};
  // Tile t's softmax, its S in s (complete): hide the keys rows do not see (kMasked: tiles some row
  // of the warpgroup sees in part); the online max (Z and O rescaled where it moves); one exp per
  // score; the keep decisions and P(t) into pa.
  // s itself is not written: ptxas serializes the wgmmas where non-wgmma instructions define an
  // accumulator while a wgmma is pending. Per 64-key half, three warp-uniform paths: every row of
  // the warp keeps every visible key (dense, or θ = -inf: P = e, the kept sums and Z come from P·1
  // at the end), some row keeps a key of the half, or none does (Z alone). keep[hf]: this warp
  // keeps a key of half hf; pv bit hf: some warp of the warpgroup does (else its P·V is skipped).
  // live: tile t exists for this warpgroup (false: only the exps turn is taken); turn: take it.
  auto softmax_of = [&](auto masked, bool live, bool turn, int t, const float (&s)[64], unsigned (&pa)[8][4], int& pv, bool (&keep)[2]) {
    constexpr bool kMasked = decltype(masked)::value;
    int lim[2] = {kKeys, kKeys};
    if (kMasked) {
      const int64_t j0 = int64_t(t) * kKeys;
#pragma unroll
      for (int r = 0; r < 2; ++r) lim[r] = int(max(int64_t(0), min(int64_t(kKeys), end[r] - j0)));
    }
    // A thread's scores: s[nt·4 + 2r + e] is key nt·8 + 2·(lane % 4) + e (nt < 16) of row r; half
    // hf (keys 64·hf ..) is s[32·hf ..]. sv(x): score x, -inf where its row does not see the key.
    auto sv = [&](int x) { return !kMasked || (x >> 2) * 8 + 2 * (lane & 3) + (x & 1) < lim[(x >> 1) & 1] ? s[x] : -INFINITY; };
    auto half_max = [&](int hf, int r) {  // this thread's max of the row's 16 values in the half (a tree: short chains)
      float m4[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int x = hf * 32 + i * 8 + 2 * r;
        m4[i] = fmaxf(fmaxf(sv(x), sv(x + 1)), fmaxf(sv(x + 4), sv(x + 5)));
      }
      return fmaxf(fmaxf(m4[0], m4[1]), fmaxf(m4[2], m4[3]));
    };
    float hm[2][2];  // [half][row]: this thread's max
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) hm[hf][0] = half_max(hf, 0), hm[hf][1] = half_max(hf, 1);
    // The row max moves past mx_up only where some thread's own max does: the quad's shuffles and
    // O's rescale run on those rare tiles only (here, with no wgmma in flight: the step waited for
    // P·V(t − 1) before this softmax). On the common path the exps then wait for no shuffle, and
    // no vote or branch for O follows the softmax.
    if (live && __any_sync(0xffffffffu, fmaxf(hm[0][0], hm[1][0]) > mx_up[0] || fmaxf(hm[0][1], hm[1][1]) > mx_up[1])) {
      float fac[2] = {1.f, 1.f};
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float m = fmaxf(hm[0][r], hm[1][r]);
        m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 1));
        m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 2));
        if (m > mx_up[r]) {  // mx = -inf: the first visible tile
          fac[r] = Exp2((mx[r] - m) * sl2);  // 0 while mx is -inf: nothing summed yet
          z[r] *= fac[r];
          mx[r] = m, mx_up[r] = m + slack, mo[r] = m * sl2;
        }
      }
#pragma unroll
      for (int nd = 0; nd < NA / 4; ++nd) acc[nd * 4] *= fac[0], acc[nd * 4 + 1] *= fac[0], acc[nd * 4 + 2] *= fac[1], acc[nd * 4 + 3] *= fac[1];
      ksum[0] *= fac[0], ksum[1] *= fac[0], ksum[2] *= fac[1], ksum[3] *= fac[1];
      FenceRegs(acc), FenceRegs(ksum);
    }
    // per half (the dense branch taken once per tile: dense_warp is the warp's for good)
    auto halves = [&](auto dense) {
      constexpr bool kDense = decltype(dense)::value;
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        // A row keeps a key of the half iff it keeps the half's largest (the rule is monotone in s).
        keep[hf] = __any_sync(0xffffffffu, hm[hf][0] > keep_above[0] || hm[hf][1] > keep_above[1]);
        // 4 values at a time (nt: keys 8·nt ..), so that few are live: their e, P packed at once,
        // and the pairs of a row summed, for a tree over the 8 pairs
        auto exps = [&](int nt, float (&e)[4]) {
#pragma unroll
          for (int i = 0; i < 4; ++i) e[i] = Exp2(fmaf(sv(hf * 32 + nt * 4 + i), sl2, -mo[i >> 1]));  // 0 where not visible
        };
        float zp[2][8];
        if constexpr (kDense) {
#pragma unroll
          for (int nt = 0; nt < 8; ++nt) {
            float e[4];
            exps(nt, e);
            PackA8(pa, hf * 8 + nt, e[0], e[1], e[2], e[3]);
          }
        } else {
          if (keep[hf]) {
#pragma unroll
            for (int nt = 0; nt < 8; ++nt) {
              float e[4], w[4];
              exps(nt, e);
#pragma unroll
              for (int i = 0; i < 4; ++i)  // w = e where kept, else 0; the count by a predicated add (not a select and an add)
                asm("{\n.reg .pred p;\nsetp.gt.f32 p, %2, %3;\nselp.f32 %0, %4, 0f00000000, p;\n@p add.s32 %1, %1, 1;\n}\n"
                    : "=f"(w[i]), "+r"(kept_n[i >> 1]) : "f"(sv(hf * 32 + nt * 4 + i)), "f"(keep_above[i >> 1]), "f"(e[i]));
              PackA8(pa, hf * 8 + nt, w[0], w[1], w[2], w[3]);
              zp[0][nt] = e[0] + e[1], zp[1][nt] = e[2] + e[3];
            }
          } else {
#pragma unroll
            for (int nt = 0; nt < 8; ++nt) {
              float e[4];
              exps(nt, e);
              zp[0][nt] = e[0] + e[1], zp[1][nt] = e[2] + e[3];
            }
#pragma unroll
            for (int i = 0; i < 16; ++i) pa[hf * 4 + (i >> 2)][i & 3] = 0u;
          }
#pragma unroll
          for (int r = 0; r < 2; ++r) z[r] += ((zp[r][0] + zp[r][1]) + (zp[r][2] + zp[r][3])) + ((zp[r][4] + zp[r][5]) + (zp[r][6] + zp[r][7]));
        }
      }
    };
    if (turn) ExpsTurnWait(wg);
    if (live) {
      if (dense_warp) halves(std::true_type{});
      else halves(std::false_type{});
    }
    if (turn) ExpsTurnPass(wg);
    if (live) pv = WgAny2(keep[0], keep[1], wg);
  };
  auto softmax = [&](bool live, bool turn, int t, const float (&s)[64], unsigned (&pa)[8][4], int& pv, bool (&keep)[2]) {
    if (t < wg_whole) softmax_of(std::false_type{}, live, turn, t, s, pa, pv, keep);
    else softmax_of(std::true_type{}, live, turn, t, s, pa, pv, keep);
  };

  const bool vbar = colsum != nullptr;  // v̄ has weight somewhere
  float vpart = 0.f;  // v̄'s numerator over the whole tiles: kThreads / D partial sums per column
  if (vbar) {  // the column sums of the whole tiles, loaded while the first tiles arrive
    constexpr int kParts = kThreads / D;
    const int d = threadIdx.x % D, part = threadIdx.x / D, n = int(min(int64_t(full_tiles), T));
    const float* cs = colsum + bg * T * D + d;
    float a[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};  // 8 loads in flight
    int t = part;
    for (; t + 7 * kParts < n; t += 8 * kParts)
#pragma unroll
      for (int i = 0; i < 8; ++i) a[i] += cs[(t + i * kParts) * D];
    for (; t < n; t += kParts) a[0] += cs[t * D];
    vpart = ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
  }

  // The pipeline: per warpgroup, with P(t) ready, issue Q·Kᵀ(t + 1) and P·V(t) back to back, wait
  // for both, run tile t + 1's softmax (P(t + 1) into the registers P·V(t) read; O rescaled there
  // if the max moved); between the two warpgroups, FlashAttention-3's ping-pong barriers alternate the
  // wgmma issue, so that one's softmax runs while the other's wgmmas do. (Overlapping P·V(t) with
  // the warpgroup's own softmax too, as FlashAttention-3 does, needs a second set of P registers;
  // ptxas then has too few left to schedule the softmax's exps apart, and the kernel was slower:
  // 32/8/128 16K, 88% of the tiles empty, 3.46 -> 3.57 ms.)
  // Tiles arrive on the bundles' mbarriers (no CTA-wide barrier in the loop: it would undo the
  // ping-pong). Stage reuse: after warpgroup 0's ping-pong sync of iteration t, warpgroup 1 has
  // arrived in its iteration t - 1, so both are past their iteration t - 2: Q·Kᵀ(t - 1) and
  // P·V(t - 2) are complete and bundle t - 2 waited for, and K(t + 2) and V(t + 1) go into those
  // tiles' stages, on bundle t + 1's barrier (t - 2's). Both warpgroups run every iteration and
  // wait for every bundle (a finished one only keeps the alternation; every copy is waited for).
  // Exps turns (Dh 64): warpgroup 0 first; each warpgroup takes one per step, live or not (the
  // prologue's softmax takes none; warpgroup 0 takes warpgroup 1's last pass after the loop).
  constexpr bool kTurns = D == 64;
  if (kTurns && wg == 1) ExpsTurnPass(wg);
  float s[64];
  unsigned pa[8][4];
  int pv = 0;  // tile t's (see softmax): bit hf set, the warpgroup multiplies half hf
  bool keep[2] = {false, false};
  if (wg_tiles > 0) {
    MbarWait(sa(&sm.k0), 0);
    issue_qk(0, s);
    WgWait<0>();
    FenceRegs(s);
    softmax(true, false, 0, s, pa, pv, keep);
  }
  if (wg == 1) PingPongArrive(wg);  // warpgroup 0 issues first
  int stage = 0;        // tile t's: t % kStages
  unsigned parity = 0;  // (t / kStages) % 2
  auto step = [&](int t) {
    const bool live = t < wg_tiles, next = t + 1 < wg_tiles;
    const int stage1 = next_stage(stage);  // tile t + 1's
    const unsigned parity1 = stage1 == 0 ? parity ^ 1u : parity;
    MbarWait(sa(&sm.bundle[stage]), parity);  // K(t + 1), V(t)
    PingPongSync(wg);
    if (next) issue_qk(stage1, s);
    // P·V(t) of the halves the warpgroup keeps keys of: each case one basic block that ends in its
    // commit (branches between the wgmmas make ptxas close a group at each block's end, and commit
    // with a dummy wgmma after their join).
    const unsigned dv = desc_v + unsigned(stage) * kStageDesc;
    auto issue_pv = [&](int h0, int h1) {
      WgFence();
#pragma unroll
      for (int hf = h0; hf <= h1; ++hf)
#pragma unroll
        for (int kc = 0; kc < 4; ++kc) {
          WgmmaRS(acc, pa[hf * 4 + kc], dv + hf * kHalfDesc + kc * 2);
          WgmmaRS(ksum, pa[hf * 4 + kc], desc_ones);
        }
      WgCommit();
    };
    const int pv_live = live ? pv : 0;
    if (pv_live == 3) issue_pv(0, 1);
    else if (pv_live == 1) issue_pv(0, 0);
    else if (pv_live == 2) issue_pv(1, 1);
    // (no P·V: no group; the wait below is for all)
    PingPongArrive(wg);
    copy_bundle(t + 1, stage1);  // K(t + 2), V(t + 1)
    WgWait<0>();  // Q·Kᵀ(t + 1) and P·V(t): P(t + 1) goes into the registers P·V(t) read
    FenceRegs(s), FenceRegs(acc), FenceRegs(ksum);
    if (kTurns) softmax(next, true, t + 1, s, pa, pv, keep);
    else if (next) softmax(true, false, t + 1, s, pa, pv, keep);
    stage = stage1, parity = parity1;
  };
  for (int t = 0; t < tiles; ++t) step(t);
  if (wg == 0) PingPongSync(wg);  // warpgroup 1's last arrival
  if (kTurns && wg == 0) ExpsTurnWait(wg);  // and its last exps pass
  FenceRegs(acc);
  __syncthreads();  // every bulk copy waited for (each warpgroup waited for every bundle)

  // v̄: the partial sums, then the column sums, in stage 1 (free now)
  float* vsum = reinterpret_cast<float*>(sm.st[1].k);  // [kThreads] partial sums, then [D] columns
  FenceProxyAsync();  // the ring's bulk copies and wgmma reads before the stages' rewrites below
  if (vbar) {
    vsum[threadIdx.x] = vpart;
    __syncthreads();
    float sum = 0.f;
    if (threadIdx.x < D)
#pragma unroll
      for (int part = 0; part < kThreads / D; ++part) sum += vsum[part * D + threadIdx.x];
    __syncthreads();
    if (threadIdx.x < D) vsum[threadIdx.x] = sum;
  }
  // v̄'s numerator of the 64-key tiles some rows see in part: their V, times the 0/1 visibility.
  // They lie within the last three tiles (the rows' ends span fewer than 128 + 64 keys), whose V the
  // ring still holds (a stage is refilled only for a tile < tiles) and this warpgroup waited for.
  float vis[NA];
#pragma unroll
  for (int i = 0; i < NA; ++i) vis[i] = 0.f;
  if (vbar)
    for (int t = full_tiles; t < cs_tiles; ++t) {
      if ((t >> 1) >= wg_tiles) continue;
      if ((t >> 1) < tiles - kStages) __trap();  // not in the ring (cannot happen: see above)
      unsigned va[4][4];
      VisibilityFragments(va, int64_t(t) * kPfKeys, lane, end);
      const unsigned dv = desc_v + unsigned((t >> 1) % kStages) * kStageDesc + unsigned(t & 1) * kHalfDesc;
      WgFence();
#pragma unroll
      for (int kc = 0; kc < 4; ++kc) WgmmaRS(vis, va[kc], dv + kc * 2);
      WgCommit();
      WgWait<0>();
      FenceRegs(vis);
    }
  __syncthreads();  // vsum complete

  // Y (a warp whose rows keep every visible key summed no kept sums in the loop)
  // The kept sums from P·1 (Σ P over the keys P·V multiplied, in fp16 as they were: their rounding
  // cancels in Y where a few keys dominate a row), a quarter per lane of the quad; a dense warp's Z
  // is that sum too.
  float kept_e[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    kept_e[r] = 0.25f * ksum[2 * r];
    if (dense_warp) z[r] = kept_e[r];
  }
  WriteRowsY<D>(p, b, h, lane, row, end, rule, kept_e, kept_n, z, true, dense_warp, mx, scale,
                [&](int nd, int r, int e) { return acc[nd * 4 + 2 * r + e]; },
                [&](int nd, int r, int e) { return vbar ? vsum[nd * 8 + 2 * (lane & 3) + e] + vis[nd * 4 + 2 * r + e] : 0.f; });
#else
  __trap();  // not built for sm_90a: PrefillSm90Available never picks this
#endif
}

template <int D>
cudaError_t LaunchD(const TopThetaParams& p, const float* colsum, int64_t T, void* ws_raw, cudaStream_t stream) {
  Sm90Tile<D>* ws = static_cast<Sm90Tile<D>*>(ws_raw);
  const int64_t T2 = (T + 1) / 2;
  if (T2 > 0) {
    StageKvKernel<D><<<dim3(unsigned(2 * T2), unsigned(p.B * p.Hkv)), kThreads, 0, stream>>>(p, ws, T2);
    if (const cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
  }
  const int smem = int(sizeof(Sm90Smem<D>));
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
  return p.B * p.Hkv * ((T + 1) / 2) * int64_t(p.Dh == 64 ? sizeof(Sm90Tile<64>) : sizeof(Sm90Tile<128>));
}

cudaError_t LaunchPrefillSm90(const TopThetaParams& p, const float* colsum, int64_t T, void* staged, cudaStream_t stream) {
  return p.Dh == 64 ? LaunchD<64>(p, colsum, T, staged, stream) : LaunchD<128>(p, colsum, T, staged, stream);
}

}  // namespace cuda_detail
}  // namespace topt
