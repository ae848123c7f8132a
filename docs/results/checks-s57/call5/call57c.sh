set -u
export PYTHONPATH=.
export BENCH_COMMIT=$(cat .data/commit)
nvidia-smi --query-gpu=name --format=csv > $OUT/gpu.txt
s=$SECONDS; timeout 130 python3 -m ionllama.kernels.selfcheck --device cuda --large --kinds latent_step,latent_generate \
  --json $OUT/selfcheck.json > $OUT/selfcheck.log 2>&1; echo "selfcheck rc=$? $((SECONDS-s)) s"; grep -c PASS $OUT/selfcheck.log; grep FAIL $OUT/selfcheck.log
C=docs/results/phase1-dropout/ionllama_fixed/config.json
for ap in 2 0 2; do
  s=$SECONDS; timeout 200 python3 -c "
import runpy, sys
from ionllama.kernels import latent_step_triton as lt
lt.set_latent_step_config(attn_proj_max_b=$ap)
sys.argv = ['bench_generation.py'] + sys.argv[1:]
runpy.run_path('benchmarks/bench_generation.py', run_name='__main__')
" --model_config $C --models ionllama --compile --compiled_only --contexts 1024 8192 32768 --budget_s 170 \
    --latent_shift previous --overlap_latent on --out $OUT/bench_ap$ap$s > $OUT/bench_ap$ap$s.log 2>&1
  echo "bench ap=$ap rc=$? $((SECONDS-s)) s"; grep -E "^\| ionllama" $OUT/bench_ap$ap$s/bench_generation.md | cut -c1-170 | head -5
done
cd $OUT && tar czf benches.tgz bench_ap* && rm -rf bench_ap*
