// TopThetaAttention on the CPU (docs/op.md): plain C++, no ONNX Runtime header.
#pragma once
#include <cstdint>

#include "top_theta_params.h"

namespace topt {

// One query row as the kernel sees it, for a RowThreshold: the n visible keys' scores a [n]
// (float32, mask added) and e [n] = exp(a - mx), Z = Σ e; c is the row's threshold column.
struct RowView {
  int64_t b, h, i, c, n;
  const float* a;
  const float* e;
  float mx, Z;
};

// A per-row threshold in place of the θ table (TopThetaCalibrate's exact top-k). Called on the
// rows with n > k, no NaN score and mx > -inf; the other rows follow op.md's special rules.
// Rows of (b, h) are visited in order i by the one thread that owns unit (b, h / G), so an
// implementation may write per-(b, h) state without locks.
class RowThreshold {
 public:
  virtual ~RowThreshold() = default;
  // θ for the row; `scratch` [n] is free to use. The kernel keeps a_j > θ (pre_softmax) or
  // e_j / Z > θ (post_softmax).
  virtual float Theta(const RowView& row, float* scratch) = 0;
  // After the keep decisions: keep [n] is 1 for the kept keys.
  virtual void Kept(const RowView& row, float theta, const uint8_t* keep) = 0;
};

// Runs the op for p.dtype float32 or float16. The caller has validated shapes and values
// (custom_ops/ort/top_theta_ort.cc); this does no checking. Parallel over (b, kv head) on up to
// `num_threads` std::threads (0: hardware concurrency, capped by the work). With `row_threshold`,
// θ of each row comes from it and p.thresholds is not read.
void RunTopThetaCpu(const TopThetaParams& p, int num_threads = 0, RowThreshold* row_threshold = nullptr);

// Bit-exact IEEE half <-> float conversions (round to nearest even; NaN stays NaN).
float HalfToFloat(uint16_t h);
uint16_t FloatToHalf(float f);

}  // namespace topt
