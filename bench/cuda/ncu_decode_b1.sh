#!/usr/bin/env bash
# ncu source counters of the decode split and merge kernels at B = 1 (32/8 heads, Dh 128, 32K and 8K,
# pre_softmax + exact SDC + VMC, union kept ~1/16), from the standalone harness (no ONNX Runtime), on
# the GPU machine:
#   bench/cuda/build.sh && bench/cuda/ncu_decode_b1.sh [HARNESS]       # writes $OUT (or ./ncu_b1)
#   python bench/cuda/sass_regions.py $OUT/sass_1_32_32768_DecodeSplitKernel.csv
set -u
cd "$(dirname "$0")/../.."
H=${1:-bench/cuda/build/harness}
O=${OUT:-ncu_b1}
mkdir -p "$O"
S="--section SpeedOfLight --section WarpStateStats --section SourceCounters --section LaunchStats --import-source no"
for shape in 1,32,32768 1,32,8192; do
  n=${shape//,/_}
  # launches 21-22 of the shape: graph replays of the timing loop, past the warm-ups
  TOPT_ONLY=$shape TOPT_ONLY_F=0.0625 timeout 200 ncu --clock-control none $S -k regex:"DecodeSplitKernel|DecodeMergeKernel" \
    --launch-skip 20 --launch-count 2 -o "$O/b$n" "$H" time > "$O/log_$n.txt" 2>&1
  ncu -i "$O/b$n.ncu-rep" > "$O/details_$n.txt" 2>&1
  for k in DecodeSplitKernel DecodeMergeKernel; do
    ncu -i "$O/b$n.ncu-rep" -k regex:$k --page source --csv --print-source sass > "$O/sass_${n}_$k.csv" 2>&1
  done
  grep -E "DecodeSplit|DecodeMerge|Duration|DRAM Throughput|Warp Cycles Per Issued|Registers" "$O/details_$n.txt" | cut -c1-150
done
