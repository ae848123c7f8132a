#!/usr/bin/env bash
# GPU call: kernel self-check, then end-to-end training throughput (ionllama vs dense), seq 8192.
export PYTHONUNBUFFERED=1 PYTHONPATH=.
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python -m ionllama.kernels.selfcheck --device cuda 2>&1 | tail -25
python benchmarks/bench_train_throughput.py --sizes tiny small --seq_len 8192 --batch_size 8 --steps 8 \
  --warmup 3 --compile --out "${OUT:-.}/train_throughput.json"
