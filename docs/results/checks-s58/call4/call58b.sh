set -u
export PYTHONPATH=.
export BENCH_COMMIT=$(cat .data/commit)
nvidia-smi --query-gpu=name --format=csv > $OUT/gpu.txt
C=docs/results/phase1-dropout/ionllama_fixed/config.json
s=$SECONDS; timeout 300 python3 benchmarks/profile_decode_step.py --model_config $C --latent_shift previous --sweep_lnn \
  --grid in_block_n=16,32 out_block_n=16,32 down_block_n=16,32 down_block_k=128,256 --bytes 1024 --budget_s 260 \
  --out $OUT/sweep_lnn > $OUT/sweep_lnn.log 2>&1
echo "sweep rc=$? $((SECONDS-s)) s"; grep -E "^\| (point|default|[0-9])" $OUT/sweep_lnn/sweep_lnn.md | head -24
for hb in 16 64; do
  s=$SECONDS; timeout 150 python3 benchmarks/bench_generation.py --kernel_config lnn:head_block_n=$hb \
    --model_config $C --models ionllama --compile --compiled_only --contexts 1024 8192 32768 --budget_s 120 \
    --latent_shift previous --overlap_latent on --out $OUT/bench_hb$hb > $OUT/bench_hb$hb.log 2>&1
  echo "bench hb=$hb rc=$? $((SECONDS-s)) s"; grep -E "^\| ionllama" $OUT/bench_hb$hb/bench_generation.md | cut -c1-170 | head -5
done
cd $OUT && tar czf benches.tgz bench_hb* sweep_lnn && rm -rf bench_hb* sweep_lnn
