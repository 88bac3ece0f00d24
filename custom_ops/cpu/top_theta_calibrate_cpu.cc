// TopThetaCalibrate CPU kernel: the TopThetaAttention kernel with an ExactTopK row threshold,
// which picks θ_row with nth_element and adds each row's θ_row and dropped log-mass to per-(b, h)
// partial sums; the partials are merged over b in a fixed order after the run.
#include "top_theta_calibrate_cpu.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <vector>

#include "top_theta_cpu.h"

namespace topt {

namespace {

constexpr double kMinusInf = -std::numeric_limits<double>::infinity();

// log(exp(x) + exp(y)) without overflow; -inf is the empty sum.
double LogAddExp(double x, double y) {
  if (x == kMinusInf) return y;
  if (y == kMinusInf) return x;
  const double hi = std::max(x, y);
  return hi + std::log1p(std::exp(-std::fabs(x - y)));
}

// Per (b, h, c): theta rows, Σ θ_row, Σ θ_row², sdc rows, log Σ exp(ℓ_row).
enum Partial : int { kThetaRows = 0, kThetaSum, kThetaSquares, kSdcRows, kLogMass, kNumPartials };

class ExactTopK final : public RowThreshold {
 public:
  explicit ExactTopK(const TopThetaParams& p)
      : p_(p), partials_(size_t(p.B * p.Hq * p.L * kNumPartials), 0.0) {
    for (size_t at = kLogMass; at < partials_.size(); at += kNumPartials) partials_[at] = kMinusInf;
  }

  // θ_row = the (k+1)-th largest of a_j (pre_softmax) or e_j / Z (post_softmax, the very
  // expression the kernel compares), duplicates counted, so a strict `>` keeps at most k.
  float Theta(const RowView& r, float* scratch) override {
    for (int64_t t = 0; t < r.n; ++t) {
      if (!std::isfinite(r.a[t])) return std::numeric_limits<float>::infinity();  // infinite inputs: keep nothing
      scratch[t] = p_.placement == Placement::kPreSoftmax ? r.a[t] : r.e[t] / r.Z;
    }
    std::nth_element(scratch, scratch + p_.k, scratch + r.n, std::greater<float>());
    return scratch[p_.k];
  }

  void Kept(const RowView& r, float theta, const uint8_t* keep) override {
    if (!std::isfinite(theta)) return;  // a row with an infinite score is not summed
    double dropped = 0.0;  // Σ_{dropped} e_j; ℓ_row = mx + log of it (absolute, not row-relative)
    for (int64_t t = 0; t < r.n; ++t) if (!keep[t]) dropped += r.e[t];
    double* s = partials_.data() + ((r.b * p_.Hq + r.h) * p_.L + r.c) * kNumPartials;
    s[kThetaRows] += 1.0;
    s[kThetaSum] += theta;
    s[kThetaSquares] += double(theta) * double(theta);
    s[kSdcRows] += 1.0;
    s[kLogMass] = LogAddExp(s[kLogMass], double(r.mx) + std::log(dropped));
  }

  // theta_sums [Hq, L, 3] and sdc_sums [Hq, L, 2] = the partials summed over b = 0, 1, … in order.
  void Merge(double* theta_sums, double* sdc_sums) const {
    const int64_t HL = p_.Hq * p_.L;
    for (int64_t hc = 0; hc < HL; ++hc) {
      double rows = 0, sum = 0, squares = 0, sdc_rows = 0, log_mass = kMinusInf;
      for (int64_t b = 0; b < p_.B; ++b) {
        const double* s = partials_.data() + (b * HL + hc) * kNumPartials;
        rows += s[kThetaRows];
        sum += s[kThetaSum];
        squares += s[kThetaSquares];
        sdc_rows += s[kSdcRows];
        log_mass = LogAddExp(log_mass, s[kLogMass]);
      }
      if (theta_sums) {
        theta_sums[hc * 3 + 0] = rows;
        theta_sums[hc * 3 + 1] = sum;
        theta_sums[hc * 3 + 2] = squares;
      }
      if (sdc_sums) {
        sdc_sums[hc * 2 + 0] = sdc_rows;
        sdc_sums[hc * 2 + 1] = log_mass;
      }
    }
  }

 private:
  const TopThetaParams& p_;
  std::vector<double> partials_;  // [B, Hq, L, kNumPartials]
};

}  // namespace

void RunTopThetaCalibrateCpu(const TopThetaCalibrateParams& p, int num_threads) {
  ExactTopK top_k(p.attention);
  RunTopThetaCpu(p.attention, num_threads, &top_k);
  top_k.Merge(p.theta_sums, p.sdc_sums);
}

}  // namespace topt
