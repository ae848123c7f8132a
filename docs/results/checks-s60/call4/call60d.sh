# session 60, call 4 (#8): where the fixed-4-byte arm's step goes at seq 8192 x 32 on an H100 (profile of 3 steps)
set -x
export BENCH_COMMIT=$(cat .data/commit) PYTHONPATH=.
R=$OUT/p; mkdir -p $R
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > $R/gpu.txt
( time timeout 300 python3 benchmarks/bench_train_throughput.py --sizes small --arms ionllama:patching=fixed --compile --compile_mode whole --step_graph --seq_len 8192 --batch_size 32 --steps 10 --profile $R/prof --out $R/t32_prof.json ) > $R/t32_prof.log 2>&1
echo "prof rc $?" >> $R/rc.txt
tar czf $OUT/p.tgz -C $OUT p
