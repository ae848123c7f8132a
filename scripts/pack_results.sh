#!/usr/bin/env bash
# Gzip the bulky files of committed results (per-step metrics.jsonl, device logs) in place. Why: every device
# call carries the whole working tree plus its data within 64 MiB, and the Gutenberg carry alone is ~47 MB;
# the readers (ionllama.train.metrics.read_metrics, the experiment report, the plots) take metrics.jsonl.gz.
# Usage: bash scripts/pack_results.sh [docs/results]   (run after unpacking a device call's results)
set -eu
find "${1:-docs/results}" -type f \( -name metrics.jsonl -o -name '*log*.txt' \) -size +32k -print0 |
  xargs -0 -r gzip -9 -n -f
