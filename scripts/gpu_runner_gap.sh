#!/usr/bin/env bash
# Where does the experiment runner lose the dense arm's speed? (train-profile.md: the dense d384 L8 step
# runs at 2.42-2.46 MB/s alone and inside Trainer.train_step, but the Phase-1 arm trained at 1.44-1.55 MB/s.)
# Runs the Phase-1 dense arm for BUDGET seconds once as is and once per change, and prints each run's MB/s.
# Env: BUDGET (30), DATA ('.data/gutenberg/gutenberg-{split}.jsonl.xz' if present, else --dataset builtin),
# VARIANTS (default below), FLAGS (extra flags for every run, e.g. "--device cpu --no-compile" for a smoke test).
# Results: $OUT/runner_gap.tgz (each run's final.json and metrics.jsonl) and the table on stdout.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=.
G=$OUT/gap; mkdir -p "$G"
data=(--dataset builtin)
gut='.data/gutenberg/gutenberg-{split}.jsonl.xz'
[ -f .data/gutenberg/gutenberg-train.jsonl.xz ] && data=(--data_path "${DATA:-$gut}")
# name:changes; a change is a flag (--key=value) or an environment variable (KEY=value)
VARIANTS=${VARIANTS:-"base: nowarmup:--no-warmup curve1:--curve_points=1 log100:--log_interval=100 omp4:OMP_NUM_THREADS=4"}
for v in $VARIANTS; do
  name=${v%%:*}; extra=""; envs=()
  for c in ${v#*:}; do case $c in -*) extra="$extra ${c//=/ }";; *) envs+=("$c");; esac; done
  env "${envs[@]}" python3 -m ionllama.cli experiment --matrix phase1 --arms dense --budget_s "${BUDGET:-30}" "${data[@]}" \
    --out "$G/$name" --ckpt_dir "/tmp/runner_gap/$name" --eval_bytes 200000 ${FLAGS:-} $extra \
    > "$G/log_$name.txt" 2>&1
  echo "$name exit $?"
done
python3 - "$G" <<'PY'
import json, sys
from pathlib import Path
for d in sorted(Path(sys.argv[1]).iterdir()):
    f = d / "dense" / "final.json"
    if f.is_file():
        t = json.loads(f.read_text())["train"]
        print(f"{d.name:10s} {t.get('steps')} steps in {round(t.get('train_time_s', 0), 1)} s: "
              f"{t.get('bytes_per_s', 0) / 1e6:.3f} MB/s")
PY
tar czf "$OUT/runner_gap.tgz" -C "$OUT" gap && rm -rf "$G"
