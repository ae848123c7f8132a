#!/usr/bin/env bash
# Issue #8's GPU checks in one call (runbook call 1): the custom-op kernels' selfcheck, training throughput
# of ionllama-small at seq 8192 for three compile modes (with profiles), and the Phase-1 shapes (seq 1024,
# batch 64) outside the trainer. Results: one archive $OUT/throughput.tgz (a call returns at most 8 files).
# Env: GPU (CUDA_VISIBLE_DEVICES, default 0), STEPS (20), MODES ("parts whole reduce-overhead"), T (seconds
# for the whole script, 540: each step gets what is left, and the archive is written even when one is cut).
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=. CUDA_VISIBLE_DEVICES=${GPU:-0}
R=$OUT/throughput; mkdir -p "$R"
log=$R/log.txt
END=$(( $(date +%s) + ${T:-540} ))
step() {  # run "$@" with the time that is left, keeping 15 s to pack the results
  local left=$(( END - $(date +%s) - 15 ))
  if [ "$left" -lt 30 ]; then echo "skipped (no time left): $*" >> "$log"; return 124; fi
  timeout -s TERM "$left" "$@" >> "$log" 2>&1
}
step python3 -m ionllama.kernels.selfcheck --device cuda --large --json "$R/selfcheck.json"
echo "selfcheck exit $?" >> "$log"
B=(python3 benchmarks/bench_train_throughput.py --steps "${STEPS:-20}" --warmup 3 --compile)
for m in ${MODES:-parts whole reduce-overhead}; do
  step "${B[@]}" --arms ionllama --sizes small --seq_len 8192 --batch_size 8 --compile_mode "$m" \
    --profile "$R/prof_$m" --out "$R/tt_$m.json"
  echo "throughput $m exit $?" >> "$log"
done
for a in tiny:dense:d_model=384,n_layers=8,n_heads=6 small:ionllama; do
  size=${a%%:*}; spec=${a#*:}; arm=${spec%%:*}
  step "${B[@]}" --compile_mode whole --sizes "$size" --arms "$spec" --seq_len 1024 --batch_size 64 \
    --profile "$R/prof_p1k_$arm" --out "$R/tt_p1k_$arm.json"
  echo "phase1 shape $arm exit $?" >> "$log"
done
tar czf "$OUT/throughput.tgz" -C "$OUT" throughput && rm -rf "$R"
