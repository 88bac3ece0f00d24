#!/usr/bin/env bash
# ncu of the decode split kernel, the real step against the microbenchmark, one call on the GPU machine:
#   a real SmolLM2 step (B=32 × 8000 tokens, pre-softmax k=256 8K table; layer 10 of the 2nd decode
#   step) and bench/decode_attention.py's node of the same shape (9/3 heads, Dh 64, union 1/16).
# After bench/generate_device.sh's staging; carry .devlib (the CUDA library) and .devx/t (the tables).
# Writes $OUT/ncu_real.txt and $OUT/ncu_micro.txt; prints duration, DRAM, per-SM active cycles.
set -uo pipefail
W=/root/w
TABLE=t_pre256_8k.json SPARSE=sparse16pre DENSE_PROMPT=1 bash bench/generate_device.sh models 2>&1 | grep -v W:onnxruntime | tail -1
. ~/ort-env.sh
export PYTHONPATH=$W/site:$PWD:$PYTHONPATH TOPT_LIBRARY_PATH=$PWD/.devlib/libtopt_ops.so
S="--section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section InstructionStats --section LaunchStats --section Occupancy --metrics sm__cycles_active.max,sm__cycles_active.min,sm__cycles_active.avg,dram__bytes_read.sum,smsp__inst_executed.sum"
timeout 240 ncu --clock-control none $S -k regex:DecodeSplitKernel --launch-skip 40 --launch-count 1 \
  python3 bench/decode_steps.py --model $W/sparse16pre/model.onnx --batch 32 --length 8000 --steps 2 > $OUT/ncu_real.txt 2>&1
timeout 240 ncu --clock-control none $S -k regex:DecodeSplitKernel --launch-skip 30 --launch-count 1 \
  python3 bench/decode_attention.py --batches 32 --contexts 8192 --heads 9:3:64 --fractions 0.0625 --repeats 1 \
  --placements pre_softmax:sdc_exact+vmc > $OUT/ncu_micro.txt 2>&1
for f in real micro; do echo "== $f"; grep -E "Duration|DRAM Throughput|dram__bytes_read|sm__cycles_active|smsp__inst_executed.sum|Grid Size|Registers Per|Achieved Occupancy|Warp Cycles Per Issued|Executed Ipc A" $OUT/ncu_$f.txt; done
