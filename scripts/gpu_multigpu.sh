#!/usr/bin/env bash
# Issues #6 / #7 on the device machine: the same training on 1 GPU (plain, and torchrun with 1 process)
# and on NPROC GPUs with DDP and FSDP2 at the same global batch, a sharded checkpoint of the FSDP run
# resumed in one plain process, then benchmarks/compare_runs.py. Carry .data/english.
#   NPROC=2 bash scripts/gpu_multigpu.sh            (nvidia-h200-x2)
#   NPROC=1 bash scripts/gpu_multigpu.sh            (one GPU: plain vs torchrun --nproc_per_node 1)
# Env: SIZE (small), STEPS (300), BS (per-GPU batch, 32), SEQ (1024), COMPILE (empty: eager; "--compile"),
# DEVICE_FLAGS (CPU smoke test: "--device cpu --mixed_precision none"). Results: $OUT/multigpu.json,
# $OUT/mgpu_metrics.tgz (every run's metrics.jsonl), $OUT/log_mgpu.txt.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # keep NVLink multicast off
N=${NPROC:-2}; STEPS=${STEPS:-300}; BS=${BS:-32}; CK=${CK:-/tmp/mgpu_ck}
log="$OUT/log_mgpu.txt"
A=(--size "${SIZE:-small}" --data_path .data/english/english-mix.jsonl.gz --data_dir data_cache
   --seq_len "${SEQ:-1024}" --max_steps "$STEPS" --entropy_steps $((STEPS / 10)) --joint_steps $((STEPS / 10))
   --log_interval 10 --eval_interval 100000 --eval_bytes 65536 --sample_bytes 0 --save_dir "$CK"
   --save_interval $((STEPS / 2)) ${DEVICE_FLAGS:---mixed_precision bf16} ${COMPILE:-})
run() { echo "== $*" >> "$log"; "$@" >> "$log" 2>&1; echo "exit $?" >> "$log"; }
TR=(python3 -m torch.distributed.run --standalone)
# one process, the same global batch as N processes (N micro-batches of BS: the same windows as N ranks)
run python3 train_cloud.py "${A[@]}" --batch_size "$BS" --grad_accum "$N" --run_name plain
run "${TR[@]}" --nproc_per_node "$N" train_cloud.py "${A[@]}" --batch_size "$BS" --parallel ddp --run_name "ddp$N"
run "${TR[@]}" --nproc_per_node "$N" train_cloud.py "${A[@]}" --batch_size "$BS" --parallel fsdp --run_name "fsdp$N"
half=$((STEPS / 2))
ck=$(ls -d "$CK/fsdp$N/step_${half}".* 2>/dev/null | head -1)
run python3 train_cloud.py "${A[@]}" --batch_size "$BS" --grad_accum "$N" --resume "$ck" --run_name resumed1
run python3 benchmarks/compare_runs.py --base "plain=$CK/plain:1" --run "ddp$N=$CK/ddp$N:$N" \
  --run "fsdp$N=$CK/fsdp$N:$N" --run "resumed1=$CK/resumed1:1" --out "$OUT/multigpu.json"
(cd "$CK" && tar czf "$OUT/mgpu_metrics.tgz" */metrics.jsonl */config.json)
tail -n 40 "$log"
