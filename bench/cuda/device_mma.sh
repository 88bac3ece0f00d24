#!/usr/bin/env bash
# One device call for the tensor-core score change: check on fresh seeds, full timing table of the
# new build, same-call A/B against the previous build (bench/cuda/build/base) and a variant
# (bench/cuda/build/v2: 4 CTAs/SM, 2-stage ring) on the focus shapes, then torch SDPA.
set -uo pipefail
cd "$(dirname "$0")/../.."
LOG=${OUT:-bench/cuda/build/logs}; mkdir -p "$LOG"
H=bench/cuda/build/harness
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader | tee "$LOG/gpu.txt"
SEED=${SEED:-$RANDOM}; NSEEDS=${NSEEDS:-2}
timeout 200 $H check "$SEED" "$NSEEDS" > "$LOG/check.txt" 2>&1; echo "check rc=$? seed=$SEED n=$NSEEDS"
grep -E "FAIL|SUMMARY|CHECK|error" "$LOG/check.txt" | head -30
timeout 150 $H time "$LOG/ours.csv" > "$LOG/ours.txt" 2>&1; echo "time rc=$?"
cat "$LOG/ours.txt"
for shape in 1,32,32768 8,32,32768 1,9,32768 8,9,32768 1,32,16384; do
  for h in bench/cuda/build/base/harness bench/cuda/build/v2/harness $H; do
    [[ -x $h ]] || continue
    echo "== $h $shape"; TOPT_ONLY=$shape timeout 40 $h time | grep -E "pre +(1\.0000|0\.06)|post +0\.06"
  done
done 2>&1 | tee "$LOG/ab.txt"
PYTHONUNBUFFERED=1 timeout 150 python3 bench/cuda/sdpa_baseline.py "$LOG/sdpa.csv" > "$LOG/sdpa.txt" 2>&1; echo "sdpa rc=$?"
cat "$LOG/sdpa.txt"
