# session 60, call 1 (#8): the attention kernels' offset loop pipelined by Triton (prefetch mode n >= 2) against the
# default (by-hand prefetch): GPU selfcheck rows, then one process timing both (graph + eager), then a greedy sweep.
set -x
export BENCH_COMMIT=$(cat .data/commit) PYTHONPATH=.
R=$OUT/r; mkdir -p $R
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > $R/gpu.txt
timeout 150 python3 -m ionllama.kernels.selfcheck --device cuda --large --kinds attention --json $R/selfcheck_attention.json > $R/selfcheck.log 2>&1
echo "selfcheck rc $?" >> $R/rc.txt
timeout 240 python3 benchmarks/bench_attention.py --out $R/attention.json --sizes 4096,16384,65536,131072 --flex-sizes 65536 --ref-max 0 --rep 50 --graph_timing --variants 2,3,4 > $R/attention.log 2>&1
echo "bench rc $?" >> $R/rc.txt
tar czf $OUT/r.tgz -C $OUT r
timeout 170 python3 benchmarks/bench_attention.py --out $R/sweep.json --sizes 65536 --no-flex --ref-max 0 --sdpa-max 0 --rep 30 --sweep 65536,131072 > $R/sweep.log 2>&1
echo "sweep rc $?" >> $R/rc.txt
tar czf $OUT/r.tgz -C $OUT r
