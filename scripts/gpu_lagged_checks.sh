#!/usr/bin/env bash
# The fifty-third session's next GPU call for issue #4 (~150-250 s on an H100, no carry): the lagged replay's CUDA
# tests (bytes on a high-priority stream, the host's patch schedule kept across runs), then the fixed-4-byte pick's
# per-byte latency from 1K to 32K of context with latent_shift "lagged" and with its own "completed", one process
# each (compiled, CUDA graphs, batch 1); then (WITH_CLI=1, the default) a lagged checkpoint through `ionllama
# generate`. Everything lands in one tarball, $OUT/lag.tgz.
# Usage (device tool): BENCH_COMMIT=$(git rev-parse --short HEAD) bash scripts/gpu_lagged_checks.sh
set -u
export PYTHONPATH=.
R=$OUT/lag; mkdir -p "$R"
C=docs/results/phase1-dropout/ionllama_fixed/config.json
nvidia-smi --query-gpu=name --format=csv > "$R/gpu.txt"
timeout 150 python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/test_decode_fast.py -k lagged \
  > "$R/pytest.log" 2>&1; echo "pytest rc=$?"; tail -n 2 "$R/pytest.log"
B="benchmarks/bench_generation.py --model_config $C --models ionllama --compile --compiled_only
   --contexts 1024 8192 32768 --budget_s 120"
for shift in lagged completed; do
  s=$SECONDS; timeout 150 python3 $B --latent_shift $shift --out "$R/$shift" > "$R/$shift.log" 2>&1
  echo "$shift rc=$? $((SECONDS - s)) s"; grep -E "^\| ionllama" "$R/$shift/bench_generation.md" | cut -c1-160
done
# Then (~120 s) a lagged fixed-patch `small` checkpoint of 200 steps through `ionllama generate`, as users run it.
if [ "${WITH_CLI:-1}" = 1 ]; then
  s=$SECONDS; timeout 120 python3 -m ionllama.cli train --size small --patching fixed --latent_shift lagged \
    --max_steps 200 --device cuda --save_dir /tmp/ckl > "$R/train.log" 2>&1; echo "train rc=$? $((SECONDS - s)) s"
  s=$SECONDS; timeout 200 python3 benchmarks/bench_cli_generate.py --checkpoint /tmp/ckl/ionllama-small-builtin/final.pt \
    --lengths 300 2048 --compile default --each_line 6 --out "$R/cli.json" > "$R/cli.log" 2>&1
  echo "cli rc=$? $((SECONDS - s)) s"; tail -n 12 "$R/cli.log"
fi
cd "$OUT" && tar czf lag.tgz lag && rm -rf lag
