#!/usr/bin/env bash
# Same-machine A/B of the batch-1 decode step (issue #4): this tree against an older one, alternating
# (A B A B) on one GPU so clock or machine drift shows up as A-A spread, not as a code difference.
# Set-up here: rm -rf .data/old && mkdir -p .data/old && git archive "$OLD" | tar -x -C .data/old
# Then run on the device with carry [".data/old"]:
#   ROUNDS=2 BUDGET=90 bash scripts/gpu_decode_ab.sh
# Each run compiles its own decode step (~45 s with the default preset, ~130 s with max-autotune) inside
# BUDGET, so BUDGET must cover compiling. Env: FLAGS (more bench_generation flags). Results: $OUT/decode_ab.tgz.
set -u
export PYTHONUNBUFFERED=1
R=$OUT/decode_ab; mkdir -p "$R"
[ -d .data/old/ionllama ] || { echo "no .data/old tree: see the set-up line at the top" >&2; exit 2; }
for i in $(seq "${ROUNDS:-2}"); do
  for t in new old; do
    d=.; [ "$t" = old ] && d=.data/old
    echo "== round $i: $t ($(date +%T))" >> "$R/log.txt"
    (cd "$d" && PYTHONPATH=. timeout $(( ${BUDGET:-90} + 60 )) python3 benchmarks/bench_generation.py --compile \
      --compiled_only --models ionllama --contexts 1024 --budget_s "${BUDGET:-90}" --out "$R/${t}_$i" ${FLAGS:-} \
      2>&1 | grep "^|" >> "$R/log.txt")
  done
done
tar czf "$OUT/decode_ab.tgz" -C "$OUT" decode_ab && rm -rf "$R"
