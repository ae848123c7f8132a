# #4 closing table: the current defaults (head + embedding kernels on), ionLlama (fixed-4-byte pick, v12 "previous"
# shift, overlap "auto") against the dense byte transformer with its KV cache, same process, batch 1 and 32,
# uncompiled and compiled (default mode) rows, contexts 1K / 8K / 32K.
set -u
export PYTHONPATH=.
export BENCH_COMMIT=$(cat .data/commit)
R=$OUT/full; mkdir -p $R
nvidia-smi --query-gpu=name --format=csv > $R/gpu.txt
C=docs/results/phase1-dropout/ionllama_fixed/config.json
s=$SECONDS; timeout 290 python3 benchmarks/bench_generation.py --model_config $C --models ionllama dense --compile \
  --contexts 1024 8192 32768 --latent_shift previous --budget_s 250 --out $R/bench > $R/bench.log 2>&1
echo "bench rc=$? $((SECONDS-s)) s"; grep -E "^\| (ionllama|dense)" $R/bench/bench_generation.md | cut -d'|' -f2,3,4,5,8,9 | cut -c1-190
cd $OUT && tar czf full.tgz full && rm -rf full
