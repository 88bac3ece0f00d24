#include "gqa_front_cpu.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "top_theta_cpu.h"

namespace topt {
namespace {

float Load(DType t, const void* base, int64_t i) {
  return t == DType::kFloat16 ? HalfToFloat(static_cast<const uint16_t*>(base)[i]) : static_cast<const float*>(base)[i];
}
void Store(DType t, void* base, int64_t i, float v) {
  if (t == DType::kFloat16) static_cast<uint16_t*>(base)[i] = FloatToHalf(v);
  else static_cast<float*>(base)[i] = v;
}

}  // namespace

void GqaPrepCpu(const GqaPrepParams& p) {
  const int64_t B = p.B, S = p.S, D = p.D, heads = p.Hq + 2 * p.Hkv, half = p.rotary_dim / 2;
  for (int64_t b = 0; b < B; ++b) p.past_seqlens[b] = std::max<int32_t>(p.seqlens_k[b] + 1 - int32_t(S), 0);
  std::vector<float> x(size_t(D), 0.f);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t s = 0; s < S; ++s) {
      const int64_t pos = p.position_ids ? p.position_ids[b * S + s] : p.past_seqlens[b] + s;
      for (int64_t h = 0; h < heads; ++h) {
        // source row: packed query, or query/key/value [B, S, H·D]
        const bool is_q = h < p.Hq, is_k = !is_q && h < p.Hq + p.Hkv;
        const void* src;
        int64_t at;
        if (p.packed()) {
          src = p.query, at = ((b * S + s) * heads + h) * D;
        } else if (is_q) {
          src = p.query, at = ((b * S + s) * p.Hq + h) * D;
        } else {
          src = is_k ? p.key : p.value, at = ((b * S + s) * p.Hkv + (h - p.Hq - (is_k ? 0 : p.Hkv))) * D;
        }
        for (int64_t d = 0; d < D; ++d) x[size_t(d)] = Load(p.dtype, src, at + d);
        if (p.cos_cache && !(h >= p.Hq + p.Hkv)) {  // RoPE on Q and K: pairs (i, i + half) or (2i, 2i + 1)
          for (int64_t i = 0; i < half; ++i) {
            const float c = Load(p.dtype, p.cos_cache, pos * half + i), sn = Load(p.dtype, p.sin_cache, pos * half + i);
            const int64_t i0 = p.rotary_interleaved ? 2 * i : i, i1 = p.rotary_interleaved ? 2 * i + 1 : i + half;
            const float x0 = x[size_t(i0)], x1 = x[size_t(i1)];
            x[size_t(i0)] = x0 * c - x1 * sn;
            x[size_t(i1)] = x1 * c + x0 * sn;
          }
        }
        void* dst;
        int64_t out;
        if (is_q) dst = p.q, out = ((b * p.Hq + h) * S + s) * D;
        else if (is_k) dst = p.k, out = ((b * p.Hkv + (h - p.Hq)) * S + s) * D;
        else dst = p.v, out = ((b * p.Hkv + (h - p.Hq - p.Hkv)) * S + s) * D;
        for (int64_t d = 0; d < D; ++d) Store(p.dtype, dst, out + d, x[size_t(d)]);
      }
    }
}

void GqaOutputCpu(const GqaOutputParams& p) {
  const size_t es = p.dtype == DType::kFloat32 ? 4 : 2, row = size_t(p.D) * es;
  for (int64_t b = 0; b < p.B; ++b)
    for (int64_t h = 0; h < p.Hq; ++h)
      for (int64_t s = 0; s < p.S; ++s)
        std::memcpy(static_cast<char*>(p.output) + size_t((b * p.S + s) * p.Hq + h) * row,
                    static_cast<const char*>(p.y) + size_t((b * p.Hq + h) * p.S + s) * row, row);
}

}  // namespace topt
