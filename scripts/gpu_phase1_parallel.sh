#!/usr/bin/env bash
# Phase-1 arms on a machine of several GPUs, one experiment process per GPU (issue #11). Each GPU trains
# its own arms one after the other, so every arm still has one whole GPU for its time budget.
# Usage on the device machine:
#   GPU0=dense,bpe GPU1=ionllama,ionllama_tf_local T=390 bash scripts/gpu_phase1_parallel.sh
# Env: T (seconds for the whole call), BUDGET (training seconds per arm, 75), OVERHEAD (expected seconds
# per arm besides training, 90), RES (results folder, docs/results/phase1), TASKS=1 (also fine-tune each
# arm on the task data and score it: --stage pretrain,tasks --task_arms <the GPU's arms>), EXTRA (more
# experiment flags, e.g. "--seed 2"), LANES (see below).
# Each process is pinned to its own share of the host's cores. Byte shards are built once first; a background loop copies docs/results/phase1 to $OUT every 20 s, so
# finished arms come back even if the call is cut off.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
T=${T:-390}; RES=${RES:-docs/results/phase1}
t0=$(date +%s)
# per-GPU overrides: BUDGET_GPU<g>, OVERHEAD_GPU<g>, RES_GPU<g>, EXTRA_GPU<g> (e.g. a 7-minute arm on one GPU,
# 75 s arms on the other; or one arm under two settings side by side, into two RES folders)
args_for() {  # the experiment flags for GPU $1
  local b="BUDGET_GPU$1" o="OVERHEAD_GPU$1" r="RES_GPU$1" x="EXTRA_GPU$1"; local res=${!r:-$RES}
  echo --matrix phase1 --budget_s "${!b:-${BUDGET:-75}}" --arm_overhead_s "${!o:-${OVERHEAD:-90}}" \
    --data_path '.data/gutenberg/gutenberg-{split}.jsonl.xz' --final_test --eval_bytes 2000000 \
    --eval_data .data/wikipedia/wikipedia-val.jsonl.xz --out "$res" --ckpt_dir "checkpoints/$(basename "$res")" ${EXTRA:-} ${!x:-}
}
common=($(args_for none))
ress="$RES"; for g in 0 1 2 3 4 5 6 7; do r="RES_GPU$g"; [ -n "${!r:-}" ] && ress="$ress ${!r}"; done
first=""; for g in 0 1 2 3 4 5 6 7; do v="GPU$g"; [ -n "${!v:-}" ] && { first=${!v%%,*}; break; }; done
python3 -m ionllama.cli experiment "${common[@]}" --stage prepare --arms "$first" > "$OUT/log_prepare.txt" 2>&1
left=$((T - ($(date +%s) - t0) - 10))
# (its output goes nowhere: a sleeping child must not hold the caller's pipes open after the kill below)
( while true; do tar czf "$OUT/phase1.tgz.part" $ress 2>/dev/null && mv "$OUT/phase1.tgz.part" "$OUT/phase1.tgz"; sleep 20; done ) \
  > /dev/null 2>&1 &
saver=$!
# Each process gets its own equal share of the host's cores (taskset, thread pools sized to match), so
# one GPU's torch.compile or data work cannot slow the other GPU's timed training: every arm's budget
# is then measured under the same host conditions.
n_proc=0; for g in 0 1 2 3 4 5 6 7; do v="GPU$g"; [ -n "${!v:-}" ] && n_proc=$((n_proc + 1)); done
# LANES (default: the number of GPUs used here) splits the cores into that many shares: LANES=2 with GPU0 only
# leaves cores and GPU 1 to another script in the same call (e.g. gpu_speed_ab.sh with ROWS_GPU0=""); with LANES,
# GPU g's process takes share g, so two invocations (GPU0=... and GPU1=...) can run side by side.
lanes=${LANES:-$n_proc}; per=$(( $(nproc) / (lanes > 0 ? lanes : 1) )); [ "$per" -lt 1 ] && per=1
pids=(); i=0
for g in 0 1 2 3 4 5 6 7; do
  var="GPU$g"; arms="${!var:-}"
  [ -z "$arms" ] && continue
  stage=(); [ "${TASKS:-0}" = 1 ] && stage=(--stage pretrain,tasks --task_arms "$arms")
  slot=$i; [ -n "${LANES:-}" ] && slot=$g  # with LANES, GPU g takes core share g (two scripts, one GPU each)
  pin=(); command -v taskset > /dev/null && pin=(taskset -c "$((slot * per))-$((slot * per + per - 1))")
  echo "GPU $g: arms $arms on cores ${pin[*]:-(not pinned: no taskset)}" >> "$OUT/log_prepare.txt"
  CUDA_VISIBLE_DEVICES=$g OMP_NUM_THREADS=$per TORCHINDUCTOR_COMPILE_THREADS=$per \
    timeout -s TERM "$left" "${pin[@]}" python3 -m ionllama.cli experiment $(args_for $g) "${stage[@]}" \
    --deadline_s $((left - 5)) --arms "$arms" > "$OUT/log_gpu$g.txt" 2>&1 &
  pids+=($!); i=$((i + 1))
done
for p in "${pids[@]}"; do wait "$p"; done
kill "$saver" 2>/dev/null
tar czf "$OUT/phase1.tgz" $ress 2>/dev/null
tail -n 8 "$OUT"/log_*.txt
