#!/usr/bin/env bash
# Issues #8 and #4 in one call on a 2-GPU machine: new fast paths against the old ones, same session.
# GPU 0 (training): the custom-op selfcheck (correctness first), ionllama-small at seq 8192, entropy and
#   fixed patching at the Phase-1 shape (fixed: no host sync, whole compile and CUDA graphs), the conv-gate
#   kernel alone, and (AB_REF) seq 8192 with the plain paths of the conv-gate op and RoPE table.
# GPU 1 (generation): the decode tests on CUDA, then compiled batch-1 decode under named compiler settings.
# Each process is pinned to its own half of the cores. Results: $OUT/speed_ab.tgz.
# Env: T (seconds for the whole call, 540), STEPS (20), AB_REF (non-empty: also the --reference paths at
#   seq 8192), GEN_VARIANTS ("name:bench_generation flags;..."), GEN_FLAGS (flags for every variant).
GEN_VARIANTS=${GEN_VARIANTS:-"default:--models ionllama dense;autotune:--models ionllama dense --compile_mode max-autotune-no-cudagraphs --inductor combo_kernels=True"}
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=.
R=$OUT/speed_ab; mkdir -p "$R/train" "$R/gen"
END=$(( $(date +%s) + ${T:-540} ))
half=$(( $(nproc) / 2 ))
step() {  # step LOG CMD...: run with the time that is left (15 s kept to pack the results)
  local log=$1; shift
  local left=$(( END - $(date +%s) - 15 ))
  if [ "$left" -lt 30 ]; then echo "skipped (no time left): $*" >> "$log"; return 124; fi
  echo "+ $*" >> "$log"
  timeout -s TERM "$left" "$@" >> "$log" 2>&1
  echo "exit $?" >> "$log"
}
train() {
  local L=$R/train/log.txt
  step "$L" python3 -m ionllama.kernels.selfcheck --device cuda --large --json "$R/train/selfcheck.json"
  local B=(python3 benchmarks/bench_train_throughput.py --steps "${STEPS:-20}" --warmup 3 --compile)
  step "$L" "${B[@]}" --arms ionllama --sizes small --seq_len 8192 --batch_size 8 --compile_mode whole \
    --profile "$R/train/prof_new" --out "$R/train/tt_whole_new.json"
  # entropy patching at the Phase-1 shape (the patch-count read on the host), then fixed patching (none)
  step "$L" "${B[@]}" --arms ionllama --sizes small --seq_len 1024 --batch_size 64 --compile_mode whole \
    --out "$R/train/tt_p1k_entropy_whole.json"
  for m in whole reduce-overhead; do
    step "$L" "${B[@]}" --arms ionllama:patching=fixed --sizes small --seq_len 1024 --batch_size 64 \
      --compile_mode "$m" --out "$R/train/tt_p1k_fixed_$m.json"
  done
  step "$L" python3 benchmarks/bench_conv_gate.py --check --out "$R/train/conv_gate.json"
  if [ -n "${AB_REF:-}" ]; then  # the same model with the plain paths of the Triton conv-gate op and RoPE table
    step "$L" "${B[@]}" --arms ionllama --sizes small --seq_len 8192 --batch_size 8 --compile_mode whole \
      --reference conv_gate rope_table --profile "$R/train/prof_old" --out "$R/train/tt_whole_old.json"
  fi
}
gen() {
  # the CUDA-graph decode paths run only here: their exactness tests first (graph replay vs eager)
  step "$R/gen/log.txt" python3 -m pytest -q -p no:cacheprovider tests/test_decode_fast.py
  # compiled batch-1 decode under named compiler settings (kernels per byte is what bounds it)
  local variants i=0 left v
  IFS=';' read -ra variants <<< "$GEN_VARIANTS"
  for v in "${variants[@]}"; do
    left=$(( (END - $(date +%s) - 40) / (${#variants[@]} - i) )); i=$((i + 1))
    step "$R/gen/log.txt" python3 benchmarks/bench_generation.py --compile --compiled_only \
      --contexts 1024 32768 --budget_s "$left" --out "$R/gen/${v%%:*}" ${v#*:} ${GEN_FLAGS:-}
  done
}
CUDA_VISIBLE_DEVICES=0 OMP_NUM_THREADS=$half taskset -c 0-$((half - 1)) bash -c "$(declare -f step train); R=$R END=$END STEPS=${STEPS:-20} AB_REF='${AB_REF:-}' train" &
p0=$!
CUDA_VISIBLE_DEVICES=1 OMP_NUM_THREADS=$half taskset -c $half-$((2 * half - 1)) bash -c "$(declare -f step gen); R=$R END=$END T=${T:-540} GEN_FLAGS='${GEN_FLAGS:-}' GEN_VARIANTS='$GEN_VARIANTS' gen" &
p1=$!
wait $p0 $p1
tar czf "$OUT/speed_ab.tgz" -C "$OUT" speed_ab && rm -rf "$R"
tar tzf "$OUT/speed_ab.tgz" | head -40
