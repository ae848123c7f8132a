#!/usr/bin/env bash
# Forty-sixth session, first device call (no carry but .data/ssd_triton_old.py): CUDA checks of the forty-fifth
# session's kernel changes, then the forty-first plan's short timings. Each part bounded; logs in $OUT.
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1
L=$OUT/log.txt
part() { local t=$1; shift; echo "== $(date +%T) $*" >> "$L"; timeout "$t" "$@" >> "$L" 2>&1; echo "rc=$? $(date +%T)" >> "$L"; }
nvidia-smi --query-gpu=name,memory.total --format=csv >> "$L"
part 150 python3 -m ionllama.kernels.selfcheck --device cuda --kinds ssd_scan,attention,compiled --large --json $OUT/selfcheck.json
S="python3 benchmarks/bench_ssd_forward.py --scan --shapes 8192x8 1024x64 --splits 0 1"
part 60 $S
cp ionllama/kernels/ssd_triton.py /tmp/ssd_new.py; cp .data/ssd_triton_old.py ionllama/kernels/ssd_triton.py
part 60 $S
cp /tmp/ssd_new.py ionllama/kernels/ssd_triton.py
part 60 $S
part 60 python3 -m pytest -q -p no:cacheprovider tests/test_decode_fast.py -k "top_k_top_p or repeated"
A="python3 benchmarks/bench_attention.py --sizes 1024,4096,16384 --no-flex --rep 50"
part 90 $A --out $OUT/att_new.json
part 90 python3 benchmarks/attention_bf16_grads.py --device cuda --n 4096 --batch 2 --heads 8 --out $OUT/att_bf16.json
cp ionllama/kernels/dilated_attention_triton.py /tmp/dat_new.py; cp .data/dat_old.py ionllama/kernels/dilated_attention_triton.py
part 90 $A --out $OUT/att_old.json
cp /tmp/dat_new.py ionllama/kernels/dilated_attention_triton.py
part 90 $A --out $OUT/att_new2.json
C=docs/results/phase1-tasks-long-dense-s1-padded/ionllama_fixed/config.json
B="python3 benchmarks/bench_task_stage.py --ways compiled --fixed_rows --steps 400 --warmup 100 --model_config $C"
part 120 $B --out $OUT/plain
part 120 $B --step_graph --out $OUT/graph
part 200 python3 benchmarks/bench_train_throughput.py --sizes small --arms ionllama:patching=fixed \
  ionllama:patching=fixed,ngram=none ionllama:patching=fixed,ngram=hash_nodigit --compile --compile_mode whole \
  --step_graph --seq_len 8192 --batch_size 8 --steps 20 --out $OUT/train8k.json
