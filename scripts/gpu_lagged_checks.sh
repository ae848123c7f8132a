#!/usr/bin/env bash
# Issue #4's decode checks on the GPU (no carry). First the CUDA tests of the overlapped latent replays ("lagged":
# bytes on a high-priority stream, the host's patch schedule kept across runs; overlap_latent: "previous" with its
# latent step beside the bytes around it). Then the fixed-4-byte pick's per-byte latency from 1K to 32K of context,
# one process per entry of SHIFTS (compiled, CUDA graphs, batch 1): "previous" (overlap off), "previous+overlap" (with
# --overlap_latent on), "previous+pairs" (the overlapped step with --overlap_pairs on: a closing byte and the next
# one as one graph), "previous+latentfirst" (the overlapped step, its latent stream at the high priority), "lagged",
# "completed" (the pick's own). BENCH_EXTRA: more bench flags for every entry (e.g. inductor's autotuning). Then
# (WITH_CLI=1) a lagged checkpoint through `ionllama generate`. Everything lands in one tarball, $OUT/lag.tgz.
# Usage (device tool): BENCH_COMMIT=$(git rev-parse --short HEAD) [SHIFTS="..."] [TESTS=0] [WITH_CLI=0] \
#   bash scripts/gpu_lagged_checks.sh   (a bench process 26-53 s on a warm machine, 70+ s on a fresh one: its compiled
#   session needs 100 s of --budget_s left after the checks, so BUDGET < ~200 skips it there; the tests ~15 s; the CLI
#   part ~150 s)
set -u
export PYTHONPATH=.
R=$OUT/lag; mkdir -p "$R"
C=docs/results/phase1-dropout/ionllama_fixed/config.json
nvidia-smi --query-gpu=name --format=csv > "$R/gpu.txt"
if [ "${TESTS:-1}" = 1 ]; then
  timeout 150 python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/test_decode_fast.py \
    -k "lagged or overlapped" > "$R/pytest.log" 2>&1; echo "pytest rc=$?"; tail -n 2 "$R/pytest.log"
fi
B="benchmarks/bench_generation.py --model_config $C --models ionllama --compile --compiled_only ${BENCH_EXTRA:-}
   --contexts 1024 8192 32768 --budget_s ${BUDGET:-230}"
for spec in ${SHIFTS:-previous previous+overlap lagged completed}; do
  shift=${spec%+*}; extra=""
  case "$spec" in previous) extra="--overlap_latent off";; *+overlap) extra="--overlap_latent on";;
    *+pairs) extra="--overlap_latent on --overlap_pairs on";;
    *+latentfirst) extra="--overlap_latent on --overlap_priority latent";; esac
  s=$SECONDS; timeout $(( ${BUDGET:-230} + 30 )) python3 $B --latent_shift $shift $extra --out "$R/$spec" > "$R/$spec.log" 2>&1
  echo "$spec rc=$? $((SECONDS - s)) s"; grep -E "^\| ionllama" "$R/$spec/bench_generation.md" | cut -c1-160
done
# A lagged fixed-patch `small` checkpoint of 200 steps through `ionllama generate`, as users run it.
if [ "${WITH_CLI:-1}" = 1 ]; then
  s=$SECONDS; timeout 120 python3 -m ionllama.cli train --size small --patching fixed --latent_shift lagged \
    --max_steps 200 --device cuda --save_dir /tmp/ckl > "$R/train.log" 2>&1; echo "train rc=$? $((SECONDS - s)) s"
  s=$SECONDS; timeout 200 python3 benchmarks/bench_cli_generate.py --checkpoint /tmp/ckl/ionllama-small-builtin/final.pt \
    --lengths 300 2048 --compile default --each_line 6 --out "$R/cli.json" > "$R/cli.log" 2>&1
  echo "cli rc=$? $((SECONDS - s)) s"; tail -n 12 "$R/cli.log"
fi
cd "$OUT" && tar czf lag.tgz lag && rm -rf lag
