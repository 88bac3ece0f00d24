#!/usr/bin/env bash
# One device call: correctness check, then decode timings of ours and torch SDPA (same call).
#   bench/cuda/run_device.sh [check seeds] [time]   logs under $OUT (or bench/cuda/build/logs)
set -uo pipefail
cd "$(dirname "$0")/../.."
LOG=${OUT:-bench/cuda/build/logs}
mkdir -p "$LOG"
H=bench/cuda/build/harness
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader | tee "$LOG/gpu.txt"
SEED=${SEED:-$RANDOM}
NSEEDS=${NSEEDS:-1}
if [[ "${DO_CHECK:-1}" == 1 ]]; then
  $H check "$SEED" "$NSEEDS" > "$LOG/check.txt" 2>&1; echo "check rc=$?"
  grep -E "FAIL|SUMMARY|CHECK|error" "$LOG/check.txt" | head -40
fi
if [[ "${DO_TIME:-1}" == 1 ]]; then
  $H time "$LOG/ours.csv" > "$LOG/ours.txt" 2>&1; echo "time rc=$?"
  PYTHONUNBUFFERED=1 python3 bench/cuda/sdpa_baseline.py "$LOG/sdpa.csv" > "$LOG/sdpa.txt" 2>&1; echo "sdpa rc=$?"
  cat "$LOG/sdpa.txt"
  cat "$LOG/ours.txt"
fi
if [[ -n "${SWEEP:-}" ]]; then  # SWEEP="B,Hq,ctx": split-count sweep on one shape (pre rows)
  for sp in ${SPLITS_LIST:-16 32 50 66 100 132}; do
    echo "splits=$sp"; TOPT_ONLY=$SWEEP TOPT_SPLITS=$sp $H time | grep " pre "
  done 2>&1 | tee "$LOG/sweep.txt"
fi
if [[ -n "${PROFILE:-}" ]]; then  # PROFILE="B,Hq,ctx": ncu of one pre split kernel
  TOPT_ONLY=$PROFILE timeout 240 ncu --kernel-name regex:DecodeSplitKernel --launch-skip 40 --launch-count 1 \
    --section SpeedOfLight --section WarpStateStats --section Occupancy --section LaunchStats \
    $H time > "$LOG/ncu.txt" 2>&1; echo "ncu rc=$?"
  grep -E "Duration|Memory Throughput|DRAM Throughput|Achieved Occupancy|Registers|Stall|Warp Cycles Per Issued|Block Limit" "$LOG/ncu.txt" | head -30
fi
