#!/usr/bin/env bash
# Forty-sixth session, second device call (carry .data/dat_old.py = `git show 197954b:ionllama/kernels/
# dilated_attention_triton.py`): the stream fix on CUDA, then the attention kernel's fp32 O timed against the old
# kernel with the host out (graph timing, batch 8), and in a seq-8192 training step, new / old / new.
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1
L=$OUT/log.txt
part() { local t=$1; shift; echo "== $(date +%T) $*" >> "$L"; timeout "$t" "$@" >> "$L" 2>&1; echo "rc=$? $(date +%T)" >> "$L"; }
nvidia-smi --query-gpu=name,memory.total --format=csv >> "$L"
part 120 python3 -m pytest -q -p no:cacheprovider tests/test_decode_fast.py -k repeated
A="python3 benchmarks/bench_attention.py --sizes 4096,16384 --batch 8 --no-flex --graph_timing --rep 100 --ref-max 1024"
T="python3 benchmarks/bench_train_throughput.py --sizes small --arms ionllama:patching=fixed --compile
   --compile_mode whole --step_graph --seq_len 8192 --batch_size 8 --steps 20"
cp ionllama/kernels/dilated_attention_triton.py /tmp/dat_new.py
for v in new old new2; do
  if [ $v = old ]; then cp .data/dat_old.py ionllama/kernels/dilated_attention_triton.py
  else cp /tmp/dat_new.py ionllama/kernels/dilated_attention_triton.py; fi
  part 100 $A --out $OUT/att_$v.json
done
for v in ${TRAIN:+new old}; do  # TRAIN=1: the training step too (~2 x 60 s)
  if [ $v = old ]; then cp .data/dat_old.py ionllama/kernels/dilated_attention_triton.py
  else cp /tmp/dat_new.py ionllama/kernels/dilated_attention_triton.py; fi
  part 150 $T --out $OUT/train8k_$v.json
done
cp /tmp/dat_new.py ionllama/kernels/dilated_attention_triton.py
