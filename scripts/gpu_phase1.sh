#!/usr/bin/env bash
# One device call of the Phase-1 matrix (issue #11). Usage on the device machine:
#   STAGE=pretrain ARMS=dense,bpe T=585 bash scripts/gpu_phase1.sh
# Finished arms are skipped, an interrupted arm resumes from checkpoints/phase1/<arm>/latest.pt while the
# machine is warm; results come back as $OUT/phase1.tgz (docs/results/phase1) and $OUT/log.txt.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=.
T=${T:-585}
timeout -s TERM "$T" python3 -m ionllama.cli experiment --matrix phase1 --stage "${STAGE:-pretrain}" \
  --budget_s "${BUDGET:-75}" --deadline_s $((T - 5)) --arm_overhead_s "${OVERHEAD:-100}" \
  --data_path '.data/gutenberg/gutenberg-{split}.jsonl.xz' --final_test --eval_bytes 2000000 \
  --eval_data .data/wikipedia/wikipedia-val.jsonl.xz --out docs/results/phase1 \
  --arms "${ARMS}" ${TASK_ARMS:+--task_arms "$TASK_ARMS"} >> "$OUT/log.txt" 2>&1
echo "exit $?" >> "$OUT/log.txt"
tar czf "$OUT/phase1.tgz" docs/results/phase1
tail -n 25 "$OUT/log.txt"
