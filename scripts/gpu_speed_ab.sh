#!/usr/bin/env bash
# Issues #8 and #4 in one call on a 2-GPU machine: training-speed rows and generation rows, one process per
# GPU, each pinned to its own half of the host cores. Results: $OUT/speed_ab.tgz.
#
# Training rows (named; ROWS_GPU0 / ROWS_GPU1 pick them, in order):
#   selfcheck        custom-op correctness on the GPU (incl. large shapes)
#   s8192            ionllama-small, seq 8192, batch 8, entropy patching, whole compile, with a profile
#   s8192_ref        the same with the plain paths of the conv-gate op and RoPE table (--reference)
#   p1k_entropy      the Phase-1 shape (seq 1024, batch 64), entropy patching (one host read per step)
#   p1k_entropy_sg, s8192_sg  p1k_entropy / s8192 (no profile) with --step_graph: the two-stage step
#   p1k_fixed        the Phase-1 shape, fixed patching (no host read), whole compile
#   p1k_fixed_ro     the same with CUDA graphs (reduce-overhead; on failure the log names the allocation)
#   conv_gate        bench_conv_gate.py --check (the kernel alone)
#   sg_tests         tests/test_step_graph.py on the GPU (replayed step == eager step; trainer + resume)
#   p1k_fixed_sg     p1k_fixed with the whole step replayed as one CUDA graph (--step_graph)
#   p1k_dense, p1k_dense_sg  the dense byte baseline (d384 L8 is the Phase-1 arm: tiny) without / with it
#   p1k_mamba        the MambaByte arm (d384 L16) with a profile: it trained at 0.30 MB/s, GPU-bound
#   p1k_byte, p1k_byte_sg  byte patching (the best ionLlama arm at 7 minutes) without / with --step_graph
#   lnn_selfcheck    the fused IntegralLNN decode step against its reference on the GPU (large shapes, compiled, graphs)
#   ssm_selfcheck    the same for the fused entropy-model step (kernels/ssm_step_triton.py)
#   latent_selfcheck the same for the fused latent step (kernels/latent_step_triton.py)
#   decode_tests     tests/test_decode_fast.py on the GPU (CUDA-graph decode == eager, all latent policies)
# Generation (GPU 1, after its training rows): the decode tests on CUDA, then one bench_generation.py run per
#   GEN_VARIANTS entry ("name:flags;name:flags"; empty: none).
# Host-bound training rows are only comparable when nothing compile-heavy shares the host: do not mix them
# with generation variants that compile (docs/results/train-profile.md, fifth session).
# Env: T (seconds for the whole call, 540), STEPS (20), ROWS_GPU0, ROWS_GPU1, GEN_VARIANTS, GEN_FLAGS, GEN_TESTS.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=.
ROWS_GPU0=${ROWS_GPU0-"sg_tests p1k_fixed p1k_fixed_sg p1k_dense p1k_dense_sg p1k_mamba"}
ROWS_GPU1=${ROWS_GPU1-"selfcheck s8192 p1k_entropy p1k_fixed_ro conv_gate"}
GEN_VARIANTS=${GEN_VARIANTS-""}
R=$OUT/speed_ab; mkdir -p "$R/train" "$R/gen"
END=$(( $(date +%s) + ${T:-540} ))
half=$(( $(nproc) / 2 ))
step() {  # step LOG CMD...: run with the time that is left (15 s kept to pack the results)
  local log=$1; shift
  local left=$(( END - $(date +%s) - 15 ))
  if [ "$left" -lt 30 ]; then echo "skipped (no time left): $*" >> "$log"; return 124; fi
  echo "+ $* ($(date +%T))" >> "$log"
  timeout -s TERM "$left" "$@" >> "$log" 2>&1
  echo "exit $? ($(date +%T))" >> "$log"
}
rows() {  # rows GPU NAMES...
  local L=$R/train/log_gpu$1.txt; shift
  local B=(python3 benchmarks/bench_train_throughput.py --steps "${STEPS:-20}" --warmup 3 --compile --sizes small)
  local p1k=(--seq_len 1024 --batch_size 64) s8k=(--seq_len 8192 --batch_size 8) name
  for name in "$@"; do
    case $name in
      selfcheck) step "$L" python3 -m ionllama.kernels.selfcheck --device cuda --large --json "$R/train/selfcheck.json" ;;
      s8192) step "$L" "${B[@]}" --arms ionllama "${s8k[@]}" --compile_mode whole --profile "$R/train/prof_s8192" \
               --out "$R/train/tt_s8192.json" ;;
      s8192_ref) step "$L" "${B[@]}" --arms ionllama "${s8k[@]}" --compile_mode whole --reference conv_gate rope_table \
                   --profile "$R/train/prof_s8192_ref" --out "$R/train/tt_s8192_ref.json" ;;
      p1k_entropy) step "$L" "${B[@]}" --arms ionllama "${p1k[@]}" --compile_mode whole --out "$R/train/tt_p1k_entropy.json" ;;
      p1k_entropy_sg) step "$L" "${B[@]}" --arms ionllama "${p1k[@]}" --compile_mode whole --step_graph \
                        --out "$R/train/tt_p1k_entropy_sg.json" ;;
      s8192_sg) step "$L" "${B[@]}" --arms ionllama "${s8k[@]}" --compile_mode whole --step_graph \
                  --out "$R/train/tt_s8192_sg.json" ;;
      p1k_fixed) step "$L" "${B[@]}" --arms ionllama:patching=fixed "${p1k[@]}" --compile_mode whole \
                   --out "$R/train/tt_p1k_fixed.json" ;;
      p1k_fixed_ro) step "$L" "${B[@]}" --arms ionllama:patching=fixed "${p1k[@]}" --compile_mode reduce-overhead \
                      --out "$R/train/tt_p1k_fixed_ro.json" ;;
      conv_gate) step "$L" python3 benchmarks/bench_conv_gate.py --check --out "$R/train/conv_gate.json" ;;
      sg_tests) step "$L" python3 -m pytest -q -p no:cacheprovider tests/test_step_graph.py ;;
      p1k_fixed_sg) step "$L" "${B[@]}" --arms ionllama:patching=fixed "${p1k[@]}" --compile_mode whole --step_graph \
                      --out "$R/train/tt_p1k_fixed_sg.json" ;;
      p1k_byte) step "$L" "${B[@]}" --arms ionllama:patching=byte "${p1k[@]}" --compile_mode whole \
                  --out "$R/train/tt_p1k_byte.json" ;;
      p1k_byte_sg) step "$L" "${B[@]}" --arms ionllama:patching=byte "${p1k[@]}" --compile_mode whole --step_graph \
                     --out "$R/train/tt_p1k_byte_sg.json" ;;
      lnn_selfcheck) step "$L" python3 -m ionllama.kernels.selfcheck --device cuda --large --kinds lnn_step,lnn_generate \
                       --json "$R/train/selfcheck_lnn.json" ;;
      ssm_selfcheck) step "$L" python3 -m ionllama.kernels.selfcheck --device cuda --large --kinds ssm_step,ssm_generate \
                       --json "$R/train/selfcheck_ssm.json" ;;
      latent_selfcheck) step "$L" python3 -m ionllama.kernels.selfcheck --device cuda --large \
                          --kinds latent_step,latent_generate --json "$R/train/selfcheck_latent.json" ;;
      decode_tests) step "$L" python3 -m pytest -q -p no:cacheprovider tests/test_decode_fast.py ;;
      p1k_dense) step "$L" "${B[@]}" --arms dense:d_model=384,n_layers=8,n_heads=6 --sizes tiny "${p1k[@]}" --compile_mode whole \
                   --out "$R/train/tt_p1k_dense.json" ;;
      p1k_dense_sg) step "$L" "${B[@]}" --arms dense:d_model=384,n_layers=8,n_heads=6 --sizes tiny "${p1k[@]}" --compile_mode whole --step_graph \
                      --out "$R/train/tt_p1k_dense_sg.json" ;;
      p1k_mamba) step "$L" "${B[@]}" --arms mamba:d_model=384,n_layers=16 --sizes tiny "${p1k[@]}" --compile_mode whole \
                   --profile "$R/train/prof_p1k_mamba" --out "$R/train/tt_p1k_mamba.json" ;;
      *) echo "unknown row $name" >> "$L" ;;
    esac
  done
}
gen() {
  [ -z "$GEN_VARIANTS" ] && return 0
  # the CUDA-graph decode paths run only on a GPU: their exactness tests first (graph replay vs eager);
  # GEN_TESTS=0 skips them when the same tree already passed them on a GPU (saves ~100 s)
  [ "${GEN_TESTS:-1}" = 1 ] && step "$R/gen/log.txt" python3 -m pytest -q -p no:cacheprovider tests/test_decode_fast.py
  local variants i=0 left v
  IFS=';' read -ra variants <<< "$GEN_VARIANTS"
  for v in "${variants[@]}"; do
    left=$(( (END - $(date +%s) - 40) / (${#variants[@]} - i) )); i=$((i + 1))
    step "$R/gen/log.txt" python3 benchmarks/bench_generation.py --compile --compiled_only \
      --contexts 1024 32768 --budget_s "$left" --out "$R/gen/${v%%:*}" ${v#*:} ${GEN_FLAGS:-}
  done
}
F="$(declare -f step rows gen); R=$R END=$END STEPS=${STEPS:-20} GEN_FLAGS='${GEN_FLAGS:-}' GEN_VARIANTS='$GEN_VARIANTS' GEN_TESTS=${GEN_TESTS:-1}"
CUDA_VISIBLE_DEVICES=0 OMP_NUM_THREADS=$half taskset -c 0-$((half - 1)) bash -c "$F; rows 0 $ROWS_GPU0" &
p0=$!
CUDA_VISIBLE_DEVICES=1 OMP_NUM_THREADS=$half taskset -c $half-$((2 * half - 1)) bash -c "$F; rows 1 $ROWS_GPU1; gen" &
p1=$!
wait $p0 $p1
tar czf "$OUT/speed_ab.tgz" -C "$OUT" speed_ab && rm -rf "$R"
tar tzf "$OUT/speed_ab.tgz" | head -40
