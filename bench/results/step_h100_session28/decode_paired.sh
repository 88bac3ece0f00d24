#!/bin/bash
# Decode B = 1 paired rounds: topt (main's library) vs torch SDPA and ORT GQA, graph replays.
set -u
. ~/ort-env.sh
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
xz -dc .devx/s25ort/lib.so.xz > /tmp/lib.so
mkdir -p $OUT
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw,clocks_throttle_reasons.active --format=csv > $OUT/smi_before.txt
for rep in ${REPS:-1}; do
  TOPT_LIBRARY_PATH=/tmp/lib.so timeout 280 python3 bench/decode_attention.py --batches ${BATCHES:-1} --contexts ${CTX:-8192,32768} --heads ${HEADS:-32:8:128} \
    --fractions ${FR:-0.0625} --placements ${PL:-pre_softmax:sdc_exact+vmc,post_softmax:vmc} --cuda-graph --repeats 30 --rounds ${ROUNDS:-100} \
    --out $OUT/decode_paired_rep$rep.json > $OUT/decode_paired_rep$rep.txt 2>&1
  echo "== rep$rep rc=$?"; grep -E "^\| " $OUT/decode_paired_rep$rep.txt | cut -c1-400
done
