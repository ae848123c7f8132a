# session 60, call 2 (#8): training throughput of small at seq 8192 (fixed 4-byte patches, the captured step), the
# default compile against inductor's GEMM autotuning (Triton GEMM templates, epilogue fusion), batch 32; cache kept
set -x
export BENCH_COMMIT=$(cat .data/commit) PYTHONPATH=.
export TORCHINDUCTOR_CACHE_DIR=$PWD/.data/ind_cache
R=$OUT/t; mkdir -p $R
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > $R/gpu.txt
B="python3 benchmarks/bench_train_throughput.py --sizes small --arms ionllama:patching=fixed --compile --compile_mode whole --step_graph --seq_len 8192 --batch_size 32 --steps 10"
( time timeout 140 $B --out $R/t32_default.json ) > $R/t32_default.log 2>&1
echo "default rc $?" >> $R/rc.txt
tar czf $OUT/t.tgz -C $OUT t
( time TORCHINDUCTOR_MAX_AUTOTUNE_GEMM=1 timeout 380 $B --out $R/t32_gemm.json ) > $R/t32_gemm.log 2>&1
echo "gemm rc $?" >> $R/rc.txt
tar czf $OUT/t.tgz -C $OUT t
