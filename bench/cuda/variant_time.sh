#!/usr/bin/env bash
# Times harness builds side by side on the GPU, alternating per shape and repetition (decode,
# pre_softmax + exact SDC + VMC, union kept ~1/16, and the same op keeping every key):
#   bench/cuda/variant_time.sh "bench/cuda/build bench/cuda/build/st3" [REPS]
# Each folder holds a `harness` (bench/cuda/build.sh; OUT=... EXTRA=... for a variant).
cd "$(dirname "$0")/../.."
VARIANTS=${1:-bench/cuda/build}
REPS=${2:-2}
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
for shape in 1,32,8192 1,32,32768 1,9,8192 1,9,32768 8,32,32768 8,9,8192; do  # B,Hq,ctx
  for rep in $(seq "$REPS"); do
    for v in $VARIANTS; do
      printf "%-24s %-12s rep%s " "$v" "$shape" "$rep"
      TOPT_ONLY=$shape "$v/harness" time | awk '$5 == "pre" && $6 + 0 > 0.05 && $6 + 0 < 0.08 {printf "f=%s ms=%s GB/s=%s ", $6, $7, $8}
                                           $5 == "pre" && $6 + 0 == 1 {printf "dense_f1 ms=%s ", $7}'
      echo
    done
  done
done
