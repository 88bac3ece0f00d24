#!/usr/bin/env bash
# Second device call: check (fresh seed) of the fused build with the sliced merge tail, A/B on the
# focus shapes against the previous build (base) and the first fused build (fused1), full table.
set -uo pipefail
cd "$(dirname "$0")/../.."
LOG=${OUT:-bench/cuda/build/logs}; mkdir -p "$LOG"
H=bench/cuda/build/harness
timeout 150 $H check "${SEED:-9401}" 2 > "$LOG/check.txt" 2>&1; echo "check rc=$?"
grep -E "FAIL|CHECK|error" "$LOG/check.txt" | head -10
for shape in 1,32,4096 1,32,8192 1,32,32768 8,32,32768 1,9,32768; do
  for h in bench/cuda/build/base/harness bench/cuda/build/fused1/harness $H; do
    [[ -x $h ]] || continue
    echo "== $h $shape"; TOPT_ONLY=$shape timeout 40 $h time | grep -E "pre +(1\.0000|0\.06)|post +0\.06"
  done
done 2>&1 | tee "$LOG/ab.txt"
timeout 170 $H time "$LOG/ours.csv" > "$LOG/ours.txt" 2>&1; echo "time rc=$?"
