#!/usr/bin/env bash
# Issue #4: one fused-kernel setting against another on batch-1 decoding, A B A B, one process each (the order of
# processes moved rates by ~1-2 % in the fifty-seventh and fifty-eighth sessions, so one pair decides nothing). Model:
# the fixed-4-byte Phase-1 pick (random weights), "previous" shift, overlapped latent step, compiled, CUDA graphs,
# contexts 1K / 8K / 32K. First (KINDS) the GPU selfcheck of those kernel kinds; last (TESTS, a pytest -k
# expression) CUDA tests of tests/test_decode_fast.py and tests/test_decode_session.py. One tarball: $OUT/ab.tgz.
# Usage (device tool; ~100 s start, selfcheck ~40 s, the first bench process ~110-230 s cold, the others 26-40 s;
# 217 s in all from a fresh start in the fifty-ninth session; enabled=2 requires the kernel, so the A side cannot
# quietly time the PyTorch step):
#   BENCH_COMMIT=$(git rev-parse --short HEAD) A="embed:enabled=2" B="embed:enabled=0" \
#     KINDS=embed_step,lnn_generate TESTS="host_schedule_graphs_equal_eager_on_cuda" bash scripts/gpu_kernel_ab.sh
# A and B: --kernel_config items (several separated by commas). BUDGET: --budget_s of the warm processes (170; the
# first gets 230: its compiled session asks for 100 s after the checks, which take longer cold).
set -u
export PYTHONPATH=.
R=$OUT/ab; mkdir -p "$R"
nvidia-smi --query-gpu=name --format=csv > "$R/gpu.txt"
if [ -n "${KINDS:-}" ]; then
  s=$SECONDS; timeout 150 python3 -m ionllama.kernels.selfcheck --device cuda --large --kinds "$KINDS" \
    --json "$R/selfcheck.json" > "$R/selfcheck.log" 2>&1
  echo "selfcheck rc=$? $((SECONDS - s)) s: $(grep -c PASS "$R/selfcheck.log") passed"; grep FAIL "$R/selfcheck.log"
fi
C=docs/results/phase1-dropout/ionllama_fixed/config.json
i=0
for cfg in "${A:?}" "${B:?}" "$A" "$B"; do
  i=$((i + 1)); budget=${BUDGET:-170}; [ $i = 1 ] && budget=230
  s=$SECONDS; timeout $((budget + 40)) python3 benchmarks/bench_generation.py --kernel_config ${cfg//,/ } \
    --model_config $C --models ionllama --compile --compiled_only --contexts 1024 8192 32768 --budget_s $budget \
    --latent_shift previous --overlap_latent on --out "$R/p$i" > "$R/p$i.log" 2>&1
  echo "process $i ($cfg) rc=$? $((SECONDS - s)) s"
  grep -E "^\| ionllama \| (throughput b1, compiled|latency, compiled)" "$R/p$i/bench_generation.md" \
    | cut -d'|' -f5,8,13
done
if [ -n "${TESTS:-}" ]; then
  timeout 200 python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/test_decode_fast.py \
    tests/test_decode_session.py -k "$TESTS" > "$R/pytest.log" 2>&1; echo "pytest rc=$?"; tail -n 3 "$R/pytest.log"
fi
cd "$OUT" && tar czf ab.tgz ab && rm -rf ab
