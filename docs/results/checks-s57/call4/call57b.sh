set -u
export PYTHONPATH=.
export BENCH_COMMIT=$(cat .data/commit)
nvidia-smi --query-gpu=name --format=csv > $OUT/gpu.txt
s=$SECONDS; timeout 150 python3 -m ionllama.kernels.selfcheck --device cuda --large --kinds latent_step,latent_generate \
  --json $OUT/selfcheck.json > $OUT/selfcheck.log 2>&1; echo "selfcheck rc=$? $((SECONDS-s)) s"; tail -n 4 $OUT/selfcheck.log
C=docs/results/phase1-dropout/ionllama_fixed/config.json
s=$SECONDS; timeout 200 python3 benchmarks/profile_decode_step.py --model_config $C --latent_shift previous --sweep_latent \
  --grid attn_proj_max_b=0,1 --bytes 1024 --budget_s 150 --out $OUT/sweep_ap > $OUT/sweep_ap.log 2>&1
echo "sweep rc=$? $((SECONDS-s)) s"; grep -E "^\| (default|[0-9])" $OUT/sweep_ap/sweep_latent.md
for ap in 2 0; do
  s=$SECONDS; timeout 200 python3 -c "
import runpy, sys
from ionllama.kernels import latent_step_triton as lt
lt.set_latent_step_config(attn_proj_max_b=$ap)
sys.argv = ['bench_generation.py'] + sys.argv[1:]
runpy.run_path('benchmarks/bench_generation.py', run_name='__main__')
" --model_config $C --models ionllama --compile --compiled_only --contexts 1024 8192 32768 --budget_s 170 \
    --latent_shift previous --overlap_latent on --out $OUT/bench_ap$ap > $OUT/bench_ap$ap.log 2>&1
  echo "bench ap=$ap rc=$? $((SECONDS-s)) s"; grep -E "^\| ionllama" $OUT/bench_ap$ap/bench_generation.md | cut -c1-170
done
