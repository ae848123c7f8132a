set -u
export PYTHONPATH=.
export BENCH_COMMIT=$(cat .data/commit)
timeout 200 python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/test_decode_fast.py -k compiled_overlapped \
  > $OUT/pytest.log 2>&1; echo "pytest rc=$?"; tail -n 2 $OUT/pytest.log
# #4: the overlap with inductor's autotuning, bytes-first vs latent-first priority (A B, then A again)
A="--compile_mode max-autotune-no-cudagraphs --inductor combo_kernels=True coordinate_descent_tuning=True"
mkdir -p $OUT/r1 $OUT/r2
OUT=$OUT/r1 BENCH_EXTRA="$A" BUDGET=420 SHIFTS="previous+overlap previous+latentfirst" TESTS=0 WITH_CLI=0 \
  bash scripts/gpu_lagged_checks.sh
OUT=$OUT/r2 BENCH_EXTRA="$A" BUDGET=200 SHIFTS="previous+overlap" TESTS=0 WITH_CLI=0 bash scripts/gpu_lagged_checks.sh
