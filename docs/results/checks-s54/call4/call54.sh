set -u
export PYTHONPATH=.
R=$OUT/c; mkdir -p $R
C=docs/results/phase1-dropout/ionllama_fixed/config.json
nvidia-smi --query-gpu=name --format=csv > $R/gpu.txt
timeout 60 python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/test_decode_fast.py -k "lagged or overlapped" > $R/pytest.log 2>&1; echo "pytest rc=$?"; tail -n 1 $R/pytest.log
for spec in previous previous+nopairs; do s=$SECONDS; x=""; [ $spec = previous+nopairs ] && x="--overlap_pairs off"
  timeout 150 python3 benchmarks/bench_generation.py --model_config $C --models ionllama --compile --compiled_only \
    --contexts 1024 8192 32768 --budget_s 140 --latent_shift ${spec%+nopairs} $x --out $R/$spec > $R/$spec.log 2>&1
  echo "$spec rc=$? $((SECONDS - s)) s"; grep -E "^\| ionllama" $R/$spec/bench_generation.md | cut -c1-190; done
s=$SECONDS; timeout 80 python3 -m ionllama.cli train --size small --patching fixed --max_steps 200 --device cuda \
  --save_dir /tmp/ck > $R/train.log 2>&1; echo "train rc=$? $((SECONDS - s)) s"; tail -n 3 $R/train.log | cut -c1-200
s=$SECONDS; timeout 110 python3 benchmarks/bench_cli_generate.py --checkpoint /tmp/ck/ionllama-small-builtin/final.pt \
  --lengths 300 2048 --compile default --each_line 6 --out $R/cli.json > $R/cli.log 2>&1
echo "cli rc=$? $((SECONDS - s)) s"; tail -n 14 $R/cli.log | cut -c1-220
cd $OUT && tar czf c.tgz c && rm -rf c
