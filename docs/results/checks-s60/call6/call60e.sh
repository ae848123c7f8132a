# session 60, call 6 (#8; did not run: no machine): the training kernels' GPU selfcheck on the final tree (large cases; attention ran in calls 1 and 3)
set -x
export BENCH_COMMIT=$(cat .data/commit) PYTHONPATH=.
R=$OUT/s; mkdir -p $R
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > $R/gpu.txt
( time timeout 140 python3 -m ionllama.kernels.selfcheck --device cuda --large --kinds scan,conv_gate,ssd_scan,rope,block,compiled --json $R/selfcheck_all.json ) > $R/selfcheck_all.log 2>&1
echo "selfcheck rc $?" >> $R/rc.txt
tar czf $OUT/s.tgz -C $OUT s
