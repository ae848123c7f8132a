# session 60, call 3 (#8): prefetch depth 2 (two offsets ahead, in registers) against the default depth 1: GPU
# selfcheck rows, one process timing depths 0 / 1 / 2 (graph + eager), then the greedy sweep and the table with its pick
set -x
export BENCH_COMMIT=$(cat .data/commit) PYTHONPATH=.
R=$OUT/r; mkdir -p $R
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > $R/gpu.txt
timeout 150 python3 -m ionllama.kernels.selfcheck --device cuda --large --kinds attention --json $R/selfcheck_attention.json > $R/selfcheck.log 2>&1
echo "selfcheck rc $?" >> $R/rc.txt
timeout 200 python3 benchmarks/bench_attention.py --out $R/attention.json --sizes 4096,16384,65536,131072 --flex-sizes 65536 --ref-max 0 --rep 50 --graph_timing --variants 0,2 > $R/attention.log 2>&1
echo "bench rc $?" >> $R/rc.txt
tar czf $OUT/r.tgz -C $OUT r
timeout 200 python3 benchmarks/bench_attention.py --out $R/sweep.json --sizes 16384,65536,131072 --no-flex --ref-max 0 --rep 50 --graph_timing --sweep 65536,131072 --profile 65536 > $R/sweep.log 2>&1
echo "sweep rc $?" >> $R/rc.txt
tar czf $OUT/r.tgz -C $OUT r
