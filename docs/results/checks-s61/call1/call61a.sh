# session 61, call 1 (#8): the training kernels' GPU selfcheck on the final tree (large cases), then attention's rows
set -x
export BENCH_COMMIT=$(cat .data/commit) PYTHONPATH=.
R=$OUT/s; mkdir -p $R
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > $R/gpu.txt
( time timeout 170 python3 -m ionllama.kernels.selfcheck --device cuda --large --kinds scan,conv_gate,ssd_scan,rope,block,compiled --json $R/selfcheck_all.json ) > $R/selfcheck_all.log 2>&1
echo "selfcheck rc $?" >> $R/rc.txt
tar czf $OUT/s.tgz -C $OUT s
( time timeout 200 python3 -m ionllama.kernels.selfcheck --device cuda --large --kinds attention --json $R/selfcheck_attn.json ) > $R/selfcheck_attn.log 2>&1
echo "selfcheck attention rc $?" >> $R/rc.txt
tar czf $OUT/s.tgz -C $OUT s
( time timeout 180 python3 -m ionllama.kernels.selfcheck --device cuda --large --kinds lnn_step,lnn_generate,byte_head,embed_step,ssm_step,ssm_generate,latent_step,latent_generate --json $R/selfcheck_decode.json ) > $R/selfcheck_decode.log 2>&1
echo "selfcheck decode rc $?" >> $R/rc.txt
tar czf $OUT/s.tgz -C $OUT s
