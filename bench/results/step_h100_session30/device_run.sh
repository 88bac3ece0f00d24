#!/bin/bash
# Session 30, after ORT staging: MODE=tests (tests/cuda with the new library) or MODE=bench (prefill paired, new/base alternating)
set -u
. ~/ort-env.sh
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
xz -dc .devx/s30/new.so.xz > /tmp/new.so; xz -dc .devx/s30/base.so.xz > /tmp/base.so; [ -f .devx/s30/race.so.xz ] && xz -dc .devx/s30/race.so.xz > /tmp/race.so
mkdir -p $OUT
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw,clocks_throttle_reasons.active --format=csv > $OUT/smi_before.txt
if [ "$MODE" = tests ]; then
  TOPT_LIBRARY_PATH=/tmp/new.so timeout ${TT:-450} python3 -m pytest -q ${TESTS:-tests/cuda} > $OUT/cuda_tests_h100_session30.txt 2>&1; echo "tests rc=$?"; tail -3 $OUT/cuda_tests_h100_session30.txt
fi
if [ "$MODE" = bench ]; then
  for rep in ${REPS:-1}; do for lib in ${LIBS:-new base}; do
    TOPT_LIBRARY_PATH=/tmp/$lib.so timeout ${BT:-250} python3 bench/prefill_attention.py --heads ${HEADS:-9:3:64} --lengths ${LENS:-4096,8192,16384} \
      --skips ${SKIPS:-0,0.7,0.9} --placements pre_softmax:sdc_exact+vmc --repeats 5 --rounds ${ROUNDS:-16} \
      --out $OUT/prefill_paired_${lib}_rep$rep.json > $OUT/prefill_paired_${lib}_rep$rep.txt 2>&1
    echo "== $lib rep$rep rc=$?"; grep -E "^\| " $OUT/prefill_paired_${lib}_rep$rep.txt | cut -c1-260
  done; done
  gzip -f $OUT/*.json
fi
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw,clocks_throttle_reasons.active --format=csv > $OUT/smi_after.txt
if [ "$MODE" = final ]; then
  # 1) paired prefill, 32/8/128 (new = HEAD for Dh 128) and a third 9/3/64 rep, 64-row tiles
  for lib in new base; do
    TOPT_LIBRARY_PATH=/tmp/$lib.so timeout 200 python3 bench/prefill_attention.py --heads 32:8:128,9:3:64 --lengths 4096,8192,16384 \
      --skips 0.7,0.9 --placements pre_softmax:sdc_exact+vmc --tile-rows 64 --repeats 5 --rounds 40 \
      --out $OUT/prefill_paired_both_${lib}_${TAG:-rep3}.json > $OUT/prefill_paired_both_${lib}_${TAG:-rep3}.txt 2>&1
    echo "== $lib rc=$?"; grep -E "^\| 1" $OUT/prefill_paired_both_${lib}_${TAG:-rep3}.txt | sed 's/| pre_softmax |//' | cut -c1-170
  done
  gzip -f $OUT/*.json
fi
if [ "$MODE" = race ]; then
  for lib in ${LIBS:-base new}; do
    TOPT_LIBRARY_PATH=/tmp/$lib.so timeout 200 /usr/local/cuda/bin/compute-sanitizer --tool racecheck --target-processes all python3 -m pytest -q tests/cuda/test_cuda_prefill.py -k "${RK:-s32001 or s32008 or s32009}" > $OUT/racecheck_prefill_$lib.txt 2>&1
    echo "racecheck $lib rc=$?"; grep -E "Race reported|RACECHECK SUMMARY|passed" $OUT/racecheck_prefill_$lib.txt | cut -c1-200
  done
  TOPT_CUDA_PREFILL_SM90=0 TOPT_LIBRARY_PATH=/tmp/new.so timeout 200 /usr/local/cuda/bin/compute-sanitizer --tool racecheck --target-processes all python3 -m pytest -q tests/cuda/test_cuda_prefill.py -k "${RK:-s32001 or s32008 or s32009}" > $OUT/racecheck_prefill_nosm90.txt 2>&1
  echo "racecheck nosm90 rc=$?"; grep -E "Race reported|RACECHECK SUMMARY|passed" $OUT/racecheck_prefill_nosm90.txt | cut -c1-200
fi
if [ "$MODE" = sanitize ]; then
  # 2) sanitizer on the prefill tests with the new library
  TOPT_LIBRARY_PATH=/tmp/new.so timeout 280 /usr/local/cuda/bin/compute-sanitizer --tool memcheck --target-processes all python3 -m pytest -q tests/cuda/test_cuda_prefill.py > $OUT/memcheck_prefill.txt 2>&1
  echo "memcheck rc=$?"; tail -3 $OUT/memcheck_prefill.txt
  TOPT_LIBRARY_PATH=/tmp/new.so timeout 280 /usr/local/cuda/bin/compute-sanitizer --tool synccheck --target-processes all python3 -m pytest -q tests/cuda/test_cuda_prefill.py > $OUT/synccheck_prefill.txt 2>&1
  echo "synccheck rc=$?"; tail -3 $OUT/synccheck_prefill.txt
  TOPT_LIBRARY_PATH=/tmp/new.so timeout 200 /usr/local/cuda/bin/compute-sanitizer --tool racecheck --target-processes all python3 -m pytest -q tests/cuda/test_cuda_prefill.py -k "${RK:-s32001 or s32008 or s32009}" > $OUT/racecheck_prefill.txt 2>&1
  echo "racecheck rc=$?"; tail -3 $OUT/racecheck_prefill.txt
fi
