// TopThetaAttention on the CPU (docs/op.md): plain C++, no ONNX Runtime header.
#pragma once
#include <cstdint>

#include "top_theta_params.h"

namespace topt {

// Runs the op for p.dtype float32 or float16. The caller has validated shapes and values
// (custom_ops/ort/top_theta_params_from_ort.cc); this does no checking. Parallel over (b, kv head)
// on up to `num_threads` std::threads (0: hardware concurrency, capped by the work).
void RunTopThetaCpu(const TopThetaParams& p, int num_threads = 0);

// Bit-exact IEEE half <-> float conversions (round to nearest even; NaN stays NaN).
float HalfToFloat(uint16_t h);
uint16_t FloatToHalf(float f);

}  // namespace topt
