// TopThetaCalibrate on the CPU (docs/op.md, last section): plain C++, no ONNX Runtime header.
#pragma once
#include "top_theta_params.h"

namespace topt {

// Exact top-k attention (TopThetaAttention's CPU kernel with θ_row = the row's (k+1)-th largest
// compared value) and the per-(head, column) sums, for p.attention.dtype float32 or float16. The
// caller has validated everything. The sums are reproducible: each (b, h) accumulates its rows in
// order i, and the batches are merged in order b whatever the thread count.
void RunTopThetaCalibrateCpu(const TopThetaCalibrateParams& p, int num_threads = 0);

}  // namespace topt
