# #4: ionLlama (new defaults) and the dense KV-cache model in one process, CUDA graphs, not compiled: batch 1 and 32,
# latency at 1K / 8K / 32K (the compiled batch-1 rows are call 1-3's). Fits what is left of the budget (~150 s).
set -u
export PYTHONPATH=.
export BENCH_COMMIT=$(cat .data/commit)
R=$OUT/same; mkdir -p $R
nvidia-smi --query-gpu=name --format=csv > $R/gpu.txt
C=docs/results/phase1-dropout/ionllama_fixed/config.json
s=$SECONDS; timeout 130 python3 benchmarks/bench_generation.py --model_config $C --models ionllama dense \
  --contexts 1024 8192 32768 --latent_shift previous --budget_s 110 --out $R/bench > $R/bench.log 2>&1
echo "bench rc=$? $((SECONDS-s)) s"; grep -E "^\| (ionllama|dense)" $R/bench/bench_generation.md | cut -d'|' -f2,3,4,5,8 | cut -c1-160
cd $OUT && tar czf same.tgz same && rm -rf same
