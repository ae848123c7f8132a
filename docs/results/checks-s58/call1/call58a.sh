set -u
export PYTHONPATH=.
export BENCH_COMMIT=$(cat .data/commit)
nvidia-smi --query-gpu=name --format=csv > $OUT/gpu.txt
s=$SECONDS; timeout 130 python3 -m ionllama.kernels.selfcheck --device cuda --large --kinds byte_head,lnn_generate \
  --json $OUT/selfcheck.json > $OUT/selfcheck.log 2>&1; echo "selfcheck rc=$? $((SECONDS-s)) s"; grep -c PASS $OUT/selfcheck.log; grep FAIL $OUT/selfcheck.log | head
C=docs/results/phase1-dropout/ionllama_fixed/config.json
for hb in 32 0 32; do
  s=$SECONDS; timeout 200 python3 benchmarks/bench_generation.py --kernel_config lnn:head_block_n=$hb \
    --model_config $C --models ionllama --compile --compiled_only --contexts 1024 8192 32768 --budget_s 170 \
    --latent_shift previous --overlap_latent on --out $OUT/bench_hb$hb$s > $OUT/bench_hb$hb$s.log 2>&1
  echo "bench hb=$hb rc=$? $((SECONDS-s)) s"; grep -E "^\| ionllama" $OUT/bench_hb$hb$s/bench_generation.md | cut -c1-170 | head -5
done
s=$SECONDS; timeout 150 python3 benchmarks/profile_decode_step.py --model_config $C --latent_shift previous \
  --overlap_latent on --kernel_config lnn:head_block_n=32 --bytes 1024 --budget_s 120 --out $OUT/prof > $OUT/prof.log 2>&1
echo "prof rc=$? $((SECONDS-s)) s"; ls $OUT/prof; head -c 3000 $OUT/prof/*.md
cd $OUT && tar czf benches.tgz bench_hb* prof && rm -rf bench_hb* prof
