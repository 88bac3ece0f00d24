#!/usr/bin/env bash
# Times the default build against bench/cuda/build/v2/harness (a compile-time variant of
# tt_decode.cu, e.g. -DTOPT_DECODE_STAGES=2 -DTOPT_DECODE_MIN_BLOCKS=4) on a few decode shapes.
cd "$(dirname "$0")/../.."
for shape in 1,32,32768 8,32,32768 1,9,32768; do
  for h in bench/cuda/build/harness bench/cuda/build/v2/harness; do
    echo "== $h $shape"; TOPT_ONLY=$shape $h time | grep -E "1\.0000|0\.06"
  done
done
