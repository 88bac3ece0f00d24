// TopThetaAttention CPU kernel: docs/op.md, literally. One work unit is one (batch b, KV head g):
// it writes present_key/value[b, g], present_v_sum[b, g], and, for the G query heads of g, Y and
// stats; the group's heads are handled together so stats[..., 5] (the union of their kept V rows)
// needs no second pass. Scores, sums and Y are float32; fp16 is converted on load and rounded
// once on store. TopThetaCalibrate runs this same kernel with a RowThreshold giving θ per row.
//
// CMake compiles this file twice on x86-64: as is, and with -mavx2 -mfma and
// TOPT_CPU_AVX2_VARIANT defined, which names the entry point RunTopThetaCpuAvx2 and leaves out
// the half conversions; RunTopThetaCpu dispatches to it when the processor has AVX2 and FMA.
#include "top_theta_cpu.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <thread>
#include <type_traits>
#include <vector>

namespace topt {

namespace {

constexpr float kMaskedAtOrBelow = -10000.f;  // a float mask entry m <= -10000 masks the key
constexpr float kInf = std::numeric_limits<float>::infinity();

uint32_t BitsOf(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

float FloatOf(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

}  // namespace

#ifndef TOPT_CPU_AVX2_VARIANT
float HalfToFloat(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  const uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0) {  // zero or subnormal: mantissa · 2^-24, exact in float
    const float magnitude = std::ldexp(float(mantissa), -24);
    return sign ? -magnitude : magnitude;
  }
  if (exponent == 31) return FloatOf(sign | 0x7f800000u | (mantissa << 13));  // inf, NaN
  return FloatOf(sign | ((exponent + 112) << 23) | (mantissa << 13));
}

uint16_t FloatToHalf(float f) {
  // Round to nearest even through integer arithmetic on the float's bits (F. Giesen's
  // float_to_half_fast3_rtne); subnormals round by one float addition that aligns the ulps.
  uint32_t u = BitsOf(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  u &= 0x7fffffffu;
  if (u >= (127u + 16u) << 23) {  // |f| >= 65536 (or inf, NaN): half inf or quiet NaN
    return uint16_t(sign | (u > 0x7f800000u ? 0x7e00u : 0x7c00u));
  }
  if (u < (113u << 23)) {  // |f| < 2^-14: half subnormal or zero
    const float magic = FloatOf(126u << 23);  // 0.5: its ulp is 2^-24, the half subnormal step
    return uint16_t(sign | (BitsOf(FloatOf(u) + magic) - (126u << 23)));
  }
  const uint32_t mantissa_odd = (u >> 13) & 1u;
  u += (uint32_t(15 - 127) << 23) + 0xfffu + mantissa_odd;  // rebias, round; may carry to inf
  return uint16_t(sign | (u >> 13));
}
#endif

namespace {

template <typename T>
inline float Load(const T* x) {
  if constexpr (std::is_same_v<T, float>) {
    return *x;
  } else {
    return HalfToFloat(*x);
  }
}

template <typename T>
inline void Store(T* x, float v) {
  if constexpr (std::is_same_v<T, float>) {
    *x = v;
  } else {
    *x = FloatToHalf(v);
  }
}

// exp(x) for x <= 0 (a score minus its row maximum) within about 2 ulp, in plain arithmetic that
// the compiler vectorises (std::exp does not, and was most of a long row's time): Cephes' expf
// polynomial after x = n·ln2 + r. Below -87.3 (under float's normal range) it gives 0; NaN stays NaN.
inline float ExpNonPositive(float x) {
  const float y = x * 1.44269504088896341f - 0.5f;
  const float n = float(int32_t(std::max(y, -127.f)));  // round to nearest for x <= 0 (truncation)
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  int32_t bits = (int32_t(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < -87.33654f ? 0.f : p * scale;
}

// Σ a[d]·b[d] in float32 over 8 interleaved partial sums, so the compiler can vectorise it
// without -ffast-math (which would also break the NaN/inf rules of op.md).
inline float Dot(const float* a, const float* b, int64_t n) {
  float partial[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t d = 0;
  for (; d + 8 <= n; d += 8) {
    for (int l = 0; l < 8; ++l) partial[l] += a[d + l] * b[d + l];
  }
  float sum = ((partial[0] + partial[1]) + (partial[2] + partial[3])) +
              ((partial[4] + partial[5]) + (partial[6] + partial[7]));
  for (; d < n; ++d) sum += a[d] * b[d];
  return sum;
}

// Dot(q, r_u) for four rows at once: the same sums in the same order as Dot (bit-identical), but
// four independent chains (GCC/Clang vector types, 8 lanes = Dot's 8 partial sums), so a 64-wide
// row is not bound by the latency of one accumulator.
typedef float Lanes8 __attribute__((vector_size(32)));

inline Lanes8 LoadLanes(const float* x) {
  Lanes8 v;
  std::memcpy(&v, x, sizeof v);
  return v;
}

inline void Dot4(const float* q, const float* const r[4], int64_t n, float out[4]) {
  Lanes8 acc[4] = {};
  int64_t d = 0;
  for (; d + 8 <= n; d += 8) {
    const Lanes8 x = LoadLanes(q + d);
    for (int u = 0; u < 4; ++u) acc[u] += x * LoadLanes(r[u] + d);
  }
  for (int u = 0; u < 4; ++u) {
    const Lanes8& a = acc[u];
    float sum = ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
    for (int64_t e = d; e < n; ++e) sum += q[e] * r[u][e];
    out[u] = sum;
  }
}

// Row j of Kall or Vall of one (b, g) as float32: the past buffer's rows before `new_begin`, the
// new input's rows from there. fp16 rows are converted once, on first use.
template <typename T>
class KvRows {
 public:
  void Reset(const T* past, const T* fresh, int64_t new_begin, int64_t total, int64_t d) {
    past_ = past;
    fresh_ = fresh;
    new_begin_ = new_begin;
    d_ = d;
    if constexpr (!std::is_same_v<T, float>) {
      cache_.resize(size_t(total * d));
      converted_.assign(size_t(total), 0);
    }
  }

  const float* Row(int64_t j) {
    const T* src = j < new_begin_ ? past_ + j * d_ : fresh_ + (j - new_begin_) * d_;
    if constexpr (std::is_same_v<T, float>) {
      return src;
    } else {
      float* dst = cache_.data() + j * d_;
      if (!converted_[size_t(j)]) {
        for (int64_t e = 0; e < d_; ++e) dst[e] = HalfToFloat(src[e]);
        converted_[size_t(j)] = 1;
      }
      return dst;
    }
  }

 private:
  const T* past_ = nullptr;
  const T* fresh_ = nullptr;
  int64_t new_begin_ = 0, d_ = 0;
  std::vector<float> cache_;
  std::vector<uint8_t> converted_;
};

// Per-thread buffers, sized for one unit.
template <typename T>
struct Scratch {
  KvRows<T> keys, values;
  std::vector<float> q, scores, probs, acc, v_mean, selection;
  std::vector<double> v_prefix;   // v_prefix[j·Dv + d] = Σ_{j' < j} V[j'][d] (VMC over a visible prefix)
  int64_t v_prefix_rows = -1;     // rows summed so far; -1: not built for this unit
  std::vector<int64_t> visible;   // indices j of the visible keys of the current row
  std::vector<uint8_t> keep;      // per visible key
  std::vector<int64_t> union_stamp;  // union_stamp[j] == row id: key j kept by some head of the row
};

// Copies one (b, g) slice of past ⧺ new into present (op.md, KV layouts).
template <typename T>
void WritePresent(const TopThetaParams& p, int64_t bg, int64_t past_rows, const void* past_v,
                  const void* new_v, void* present_v, int64_t d) {
  if (!present_v) return;
  const T* past = static_cast<const T*>(past_v);
  const T* fresh = static_cast<const T*>(new_v) + bg * p.Skv * d;
  T* present = static_cast<T*>(present_v) + bg * p.total_kv() * d;
  if (p.kv_layout == KvLayout::kConcat) {
    if (past) std::memcpy(present, past + bg * p.P * d, size_t(p.P * d) * sizeof(T));
  } else if (present_v != past_v) {  // shared_buffer bound in place: write only the new rows
    std::memcpy(present, past + bg * p.P * d, size_t(p.P * d) * sizeof(T));
  }
  std::memcpy(present + past_rows * d, fresh, size_t(p.Skv * d) * sizeof(T));
}

// Σ of V rows [0, rows) in float64, from prefix sums extended on demand (Dv doubles per row).
template <typename T>
const double* VPrefix(Scratch<T>& s, int64_t rows) {
  const int64_t Dv = int64_t(s.acc.size());
  if (s.v_prefix_rows < 0) {
    s.v_prefix.assign(size_t(Dv), 0.0);
    s.v_prefix_rows = 0;
  }
  if (rows > s.v_prefix_rows) {
    s.v_prefix.resize(size_t((rows + 1) * Dv));
    for (int64_t j = s.v_prefix_rows; j < rows; ++j) {
      const float* v = s.values.Row(j);
      const double* prev = s.v_prefix.data() + j * Dv;
      double* next = s.v_prefix.data() + (j + 1) * Dv;
      for (int64_t d = 0; d < Dv; ++d) next[d] = prev[d] + double(v[d]);
    }
    s.v_prefix_rows = rows;
  }
  return s.v_prefix.data() + rows * Dv;
}

template <typename T>
void RunUnit(const TopThetaParams& p, int64_t b, int64_t g, Scratch<T>& s, RowThreshold* row_threshold) {
  const int64_t G = p.group_size(), Dh = p.Dh, Dv = p.Dv, L = p.L;
  const int64_t bg = b * p.Hkv + g;
  const bool shared = p.kv_layout == KvLayout::kSharedBuffer;
  // Keys [0, past_rows) are past, [past_rows, new_end) new; nothing from new_end on is visible.
  const int64_t past_rows = shared ? int64_t(p.past_seqlens[b]) : p.P;
  const int64_t new_end = past_rows + p.Skv;
  // Causal: query i sits at position past_rows + i (as ONNX Runtime's Attention-23, whose
  // causal mask is top-left aligned without past; shared_buffer: p_b + i).
  const int64_t causal_offset = past_rows;

  WritePresent<T>(p, bg, past_rows, p.past_key, p.k_new, p.present_key, Dh);
  WritePresent<T>(p, bg, past_rows, p.past_value, p.v_new, p.present_value, Dv);

  const T* past_k = p.past_key ? static_cast<const T*>(p.past_key) + bg * p.P * Dh : nullptr;
  const T* past_v = p.past_value ? static_cast<const T*>(p.past_value) + bg * p.P * Dv : nullptr;
  s.keys.Reset(past_k, static_cast<const T*>(p.k_new) + bg * p.Skv * Dh, past_rows, new_end, Dh);
  s.values.Reset(past_v, static_cast<const T*>(p.v_new) + bg * p.Skv * Dv, past_rows, new_end, Dv);
  s.q.resize(size_t(Dh));
  s.scores.resize(size_t(new_end));
  s.probs.resize(size_t(new_end));
  s.visible.resize(size_t(new_end));
  s.keep.resize(size_t(new_end));
  s.selection.resize(size_t(new_end));
  s.acc.resize(size_t(Dv));
  s.v_mean.resize(size_t(Dv));
  s.union_stamp.assign(size_t(new_end), -1);
  s.v_prefix_rows = -1;
  const float* past_v_sum = p.past_v_sum ? p.past_v_sum + bg * Dv : nullptr;

  // Visible keys of (h, i) into s.visible[0, n), with their scores when `q` is given.
  auto visible_keys = [&](int64_t h, int64_t i, const float* q) -> int64_t {
    int64_t end = new_end;
    if (p.is_causal) end = std::max<int64_t>(0, std::min(end, causal_offset + i + 1));
    const int64_t mask_base = b * p.mask_stride_b + h * p.mask_stride_h + i * p.mask_stride_s;
    int64_t n = 0;
    for (int64_t j = 0; j < end; ++j) {
      float m = 0.f;
      if (p.mask_kind == MaskKind::kBool) {
        if (!static_cast<const uint8_t*>(p.mask)[mask_base + j * p.mask_stride_t]) continue;
      } else if (p.mask_kind == MaskKind::kFloat) {
        m = Load(static_cast<const T*>(p.mask) + mask_base + j * p.mask_stride_t);
        if (m <= kMaskedAtOrBelow) continue;  // NaN is not <= -10000: visible, its score NaN
      }
      if (q) s.scores[size_t(n)] = m;  // the mask term; the dot product is added below
      s.visible[size_t(n++)] = j;
    }
    if (q) {
      int64_t t = 0;
      for (; t + 4 <= n; t += 4) {
        const float* rows[4];
        float dots[4];
        for (int u = 0; u < 4; ++u) rows[u] = s.keys.Row(s.visible[size_t(t + u)]);
        Dot4(q, rows, Dh, dots);
        for (int u = 0; u < 4; ++u) s.scores[size_t(t + u)] = p.scale * dots[u] + s.scores[size_t(t + u)];
      }
      for (; t < n; ++t) {
        s.scores[size_t(t)] = p.scale * Dot(q, s.keys.Row(s.visible[size_t(t)]), Dh) + s.scores[size_t(t)];
      }
    }
    return n;
  };

  for (int64_t i = 0; i < p.S; ++i) {
    const int64_t row_id = i;  // union_stamp marks keys kept by some head of this row
    int64_t union_size = 0;
    for (int64_t r = 0; r < G; ++r) {
      const int64_t h = g * G + r;
      const T* q_src = static_cast<const T*>(p.q) + ((b * p.Hq + h) * p.S + i) * Dh;
      for (int64_t d = 0; d < Dh; ++d) s.q[size_t(d)] = Load(q_src + d);
      T* y = static_cast<T*>(p.y) + ((b * p.Hq + h) * p.S + i) * Dv;
      const int64_t n = visible_keys(h, i, s.q.data());
      if (n == 0) {  // fully masked row: Y = 0, not counted
        for (int64_t d = 0; d < Dv; ++d) Store(y + d, 0.f);
        continue;
      }

      // Threshold column: the largest c with threshold_lengths[c] <= n, else 0.
      const int64_t* lengths = p.threshold_lengths;
      const int64_t c = std::max<int64_t>(0, (std::upper_bound(lengths, lengths + L, n) - lengths) - 1);
      float theta = row_threshold ? kInf : p.thresholds[h * L + c];
      const bool dense = n <= p.k;

      bool has_nan = false;
      float mx = -kInf;
      for (int64_t t = 0; t < n; ++t) {
        const float a = s.scores[size_t(t)];
        if (std::isnan(a)) has_nan = true; else mx = std::max(mx, a);
      }
      if (has_nan) mx = std::numeric_limits<float>::quiet_NaN();

      // e_j = exp(a_j - mx) into probs; Z; the keep decisions.
      float Z = 0.f;
      {
        const float* a = s.scores.data();
        float* e = s.probs.data();
        for (int64_t t = 0; t < n; ++t) e[t] = ExpNonPositive(a[t] - mx);
        for (int64_t t = 0; t < n; ++t) Z += e[t];
      }
      const RowView row{b, h, i, c, n, s.scores.data(), s.probs.data(), mx, Z};
      const bool per_row_theta = row_threshold && !dense && !has_nan && mx != -kInf;
      if (per_row_theta) theta = row_threshold->Theta(row, s.selection.data());
      // A NaN row keeps (and reads) every visible key; a row whose scores are all -inf keeps none.
      int64_t kept = 0;
      float kept_e = 0.f;  // D = Σ_{Keep} e_j
      for (int64_t t = 0; t < n; ++t) {
        bool keep;
        if (has_nan || dense) keep = true;
        else if (mx == -kInf) keep = false;
        else if (p.placement == Placement::kPostSoftmax) keep = s.probs[size_t(t)] / Z > theta;
        else keep = s.scores[size_t(t)] > theta;
        s.keep[size_t(t)] = keep;
        if (keep) {
          ++kept;
          kept_e += s.probs[size_t(t)];
          const int64_t j = s.visible[size_t(t)];
          if (s.union_stamp[size_t(j)] != row_id) {
            s.union_stamp[size_t(j)] = row_id;
            ++union_size;
          }
        }
      }

      if (per_row_theta) row_threshold->Kept(row, theta, s.keep.data());

      if (p.stats) {
        int64_t* st = p.stats + (b * p.Hq + h) * kNumStats;
        st[kRows] += 1;
        st[kVisible] += n;
        st[kKept] += kept;
        st[kDenseRows] += dense;
        st[kBeyond] += p.calibrated_max_length > 0 && n > p.calibrated_max_length;
      }

      if (has_nan) {  // a NaN score is never hidden
        for (int64_t d = 0; d < Dv; ++d) Store(y + d, std::numeric_limits<float>::quiet_NaN());
        continue;
      }
      if (mx == -kInf) {  // every visible score -inf
        for (int64_t d = 0; d < Dv; ++d) Store(y + d, 0.f);
        continue;
      }

      // Normaliser: post_softmax and dense rows Z; pre_softmax D + M (op.md, Output).
      float denom = Z;
      if (!dense && p.placement == Placement::kPreSoftmax) {
        float M = 0.f;  // the SDC mass
        if (kept == n) {
          // nothing dropped, nothing to compensate (also for sdc_calibrated)
        } else if (p.sdc == Sdc::kExact) {  // summed over the dropped keys, not Z - D (no cancellation)
          for (int64_t t = 0; t < n; ++t) if (!s.keep[size_t(t)]) M += s.probs[size_t(t)];
        } else if (p.sdc == Sdc::kExpThreshold) {
          M = float(n - kept) * std::exp(theta - mx);
        } else if (p.sdc == Sdc::kCalibrated) {
          M = std::exp(p.sdc_log_mass[h * L + c] - mx);
        }
        denom = kept_e + M;
      }

      std::fill(s.acc.begin(), s.acc.end(), 0.f);
      float kept_p = 0.f;
      if (denom != 0.f) {
        for (int64_t t = 0; t < n; ++t) {
          if (!s.keep[size_t(t)]) continue;
          const float pj = s.probs[size_t(t)] / denom;
          kept_p += pj;
          const float* v = s.values.Row(s.visible[size_t(t)]);
          for (int64_t d = 0; d < Dv; ++d) s.acc[size_t(d)] += pj * v[d];
        }
      }
      if (p.vmc && !dense) {  // dropped mass onto the mean of the visible V rows
        std::fill(s.v_mean.begin(), s.v_mean.end(), 0.f);
        if (past_v_sum) std::copy(past_v_sum, past_v_sum + Dv, s.v_mean.begin());
        if (s.visible[size_t(n - 1)] == n - 1) {
          // The visible keys are the prefix [0, n) (causal, no holes): one difference of prefix
          // sums, built once per (b, g), instead of n rows for every head and row.
          const int64_t first = past_v_sum ? std::min(past_rows, n) : 0;
          const double* hi = VPrefix(s, n);
          const double* lo = VPrefix(s, first);
          for (int64_t d = 0; d < Dv; ++d) s.v_mean[size_t(d)] += float(hi[d] - lo[d]);
        } else {
          for (int64_t t = 0; t < n; ++t) {
            const int64_t j = s.visible[size_t(t)];
            if (past_v_sum && j < past_rows) continue;  // past rows come from the running sum
            const float* v = s.values.Row(j);
            for (int64_t d = 0; d < Dv; ++d) s.v_mean[size_t(d)] += v[d];
          }
        }
        const float w = (1.f - kept_p) / float(n);
        for (int64_t d = 0; d < Dv; ++d) s.acc[size_t(d)] += w * s.v_mean[size_t(d)];
      }
      for (int64_t d = 0; d < Dv; ++d) Store(y + d, s.acc[size_t(d)]);
    }

    if (p.stats) {
      for (int64_t r = 0; r < G; ++r) {
        p.stats[(b * p.Hq + g * G + r) * kNumStats + kGroupVRows] += union_size;
      }
    }
  }

  // present_v_sum[b, g] = base + the new rows visible to the last query row of head g·G.
  if (p.present_v_sum) {
    float* out = p.present_v_sum + bg * Dv;
    std::fill(out, out + Dv, 0.f);
    if (past_v_sum) std::copy(past_v_sum, past_v_sum + Dv, out);
    int64_t n;
    if (p.S > 0) {
      n = visible_keys(g * G, p.S - 1, nullptr);
    } else {  // no query row: the base is every past row
      n = 0;
      for (int64_t j = 0; j < past_rows; ++j) s.visible[size_t(n++)] = j;
    }
    for (int64_t t = 0; t < n; ++t) {
      const int64_t j = s.visible[size_t(t)];
      if (past_v_sum && j < past_rows) continue;
      const float* v = s.values.Row(j);
      for (int64_t d = 0; d < Dv; ++d) out[d] += v[d];
    }
  }
}

template <typename T>
void Run(const TopThetaParams& p, int num_threads, RowThreshold* row_threshold) {
  const int64_t units = p.B * p.Hkv;
  if (p.stats) std::fill(p.stats, p.stats + p.B * p.Hq * kNumStats, int64_t(0));
  if (units == 0) return;
  int64_t threads = num_threads > 0 ? num_threads : int64_t(std::thread::hardware_concurrency());
  // A thread per unit only where there is work for it: starting one costs tens of µs, about a
  // decode step's whole work (one row against a few hundred keys).
  const int64_t work = p.B * p.Hq * std::max<int64_t>(p.S, 1) * p.total_kv() * (p.Dh + p.Dv);
  constexpr int64_t kWorkPerThread = int64_t(1) << 21;
  threads = std::max<int64_t>(1, std::min({threads, units, std::max<int64_t>(1, work / kWorkPerThread)}));
  std::atomic<int64_t> next{0};
  auto worker = [&] {
    Scratch<T> scratch;
    for (int64_t u = next++; u < units; u = next++) RunUnit<T>(p, u / p.Hkv, u % p.Hkv, scratch, row_threshold);
  };
  std::vector<std::thread> pool;
  for (int64_t t = 1; t < threads; ++t) pool.emplace_back(worker);
  worker();
  for (auto& t : pool) t.join();
}

}  // namespace

#ifdef TOPT_CPU_AVX2_VARIANT
void RunTopThetaCpuAvx2(const TopThetaParams& p, int num_threads, RowThreshold* row_threshold) {
#else
#ifdef TOPT_CPU_HAVE_AVX2
void RunTopThetaCpuAvx2(const TopThetaParams& p, int num_threads, RowThreshold* row_threshold);
#endif

void RunTopThetaCpu(const TopThetaParams& p, int num_threads, RowThreshold* row_threshold) {
#ifdef TOPT_CPU_HAVE_AVX2
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (avx2) return RunTopThetaCpuAvx2(p, num_threads, row_threshold);
#endif
#endif
  if (p.dtype == DType::kFloat16) {
    Run<uint16_t>(p, num_threads, row_threshold);
  } else {
    Run<float>(p, num_threads, row_threshold);
  }
}

}  // namespace topt
