#!/usr/bin/env bash
# Builds the standalone CUDA harness (no ONNX Runtime) into bench/cuda/build/ (git-ignored):
#   bench/cuda/build.sh && bench/cuda/build/harness check 1 && bench/cuda/build/harness time
# A compile-time variant for bench/cuda/variant_time.sh (another folder, extra nvcc flags):
#   OUT=bench/cuda/build/st3 EXTRA="-DTOPT_DECODE_STAGES=3" bench/cuda/build.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
NVCC=${NVCC:-/usr/local/cuda/bin/nvcc}
OUT=${OUT:-bench/cuda/build}
mkdir -p "$OUT"
FLAGS=(-std=c++17 -O3 -lineinfo -gencode arch=compute_90a,code=sm_90a -gencode arch=compute_80,code=sm_80
       -Icustom_ops/include -Xcompiler -Wall ${EXTRA:-})
objs=()
for f in custom_ops/cuda/*.cu bench/cuda/harness.cu; do
  o="$OUT/$(basename "${f%.cu}").o"
  "$NVCC" "${FLAGS[@]}" -c "$f" -o "$o" &
  objs+=("$o")
done
"$NVCC" -std=c++17 -O3 -Icustom_ops/include -x c++ -c custom_ops/cpu/top_theta_cpu.cc -o "$OUT/top_theta_cpu.o" &
wait
"$NVCC" "${FLAGS[@]}" "${objs[@]}" "$OUT/top_theta_cpu.o" -o "$OUT/harness" -lpthread
echo "built $OUT/harness"
