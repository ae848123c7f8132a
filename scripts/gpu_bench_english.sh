#!/usr/bin/env bash
# Issue #5's GPU run: train ionLlama on the English mix, then the whole benchmark suite on its checkpoint.
# On the device machine (carry .data/english and .data/multilingual):
#   bash scripts/gpu_bench_english.sh
# Env: SIZE (small), STEPS (1200), TRAIN_S (240: a time cap on training), TASK_MIX (0.1), EXTRA (more
# train_cloud.py flags), SAVE (checkpoints), BENCH_EXTRA (more benchmark.py flags). Results: $OUT/english.tgz
# (bench/results.{json,md}, the PNGs, train_metrics.jsonl) and $OUT/log_english.txt. CPU smoke test (35 s):
#   OUT=/tmp/o SIZE=tiny STEPS=36 SEQ=256 BS=8 SAVE=/tmp/ck EXTRA="--eval_bytes 20000" BENCH_EXTRA="--n_tasks 4
#   --max_eval_bytes 20000 --max_lang_bytes 4000 --gen_bytes 32 --speed_iters 2 --compression_bytes 8000" bash scripts/gpu_bench_english.sh
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=.
SIZE=${SIZE:-small}; STEPS=${STEPS:-1200}; RUN=${RUN:-english_$SIZE}; SAVE=${SAVE:-checkpoints}
mkdir -p "$OUT/bench"
log="$OUT/log_english.txt"
dev_flags=(--mixed_precision bf16 --compile)
python3 -c 'import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)' || dev_flags=(--mixed_precision none --device cpu)
python3 train_cloud.py --size "$SIZE" --data_path .data/english/english-mix.jsonl.gz --data_dir data_cache \
  --seq_len "${SEQ:-1024}" --batch_size "${BS:-64}" --max_steps "$STEPS" --entropy_steps $((STEPS / 12)) \
  --joint_steps $((STEPS / 10)) --max_train_time "${TRAIN_S:-240}" --task_mix "${TASK_MIX:-0.1}" \
  --eval_interval $((STEPS / 4)) --save_dir "$SAVE" --run_name "$RUN" --resume auto --sample_bytes 0 \
  "${dev_flags[@]}" ${EXTRA:-} >> "$log" 2>&1
echo "train exit $?" >> "$log"
cp "$SAVE/$RUN/metrics.jsonl" "$OUT/train_metrics.jsonl" 2>/dev/null
ck="$SAVE/$RUN/best.pt"; [ -f "$ck" ] || ck="$SAVE/$RUN/latest.pt"
BENCH_COMMIT=$(git rev-parse HEAD 2>/dev/null) python3 benchmark.py --checkpoint "$ck" --output "$OUT/bench/results.json" \
  --multilingual_dir .data/multilingual/udhr --multilingual_dir .data/multilingual \
  --runs "$SAVE/$RUN" ${BENCH_EXTRA:-} >> "$log" 2>&1
echo "bench exit $?" >> "$log"
# one archive: a device call returns at most 8 files
tar czf "$OUT/english.tgz" -C "$OUT" bench train_metrics.jsonl && rm -rf "$OUT/bench" "$OUT/train_metrics.jsonl"
tail -n 30 "$log"
