"""Evaluation: byte-exact BPB (bpb), the benchmark suite (benchmark: `ionllama bench` / benchmark.py),
task scoring (task_eval), speed and memory (speed), multilingual bits (multilingual), plots and the
Markdown report (plots, report). The results.json schema is documented in docs/results/README.md."""
