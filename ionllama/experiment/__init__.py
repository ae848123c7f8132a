"""`ionllama experiment`: the Phase-1 matrix - every arm trained under the same wall-clock budget on the
same data, evaluated on the same val bytes, with a table, plots and resumable per-arm results.

    ionllama experiment --matrix phase1 --budget_s 420 \\
        --data_path '../shared/data/gutenberg/gutenberg-{split}.jsonl.xz' --out docs/results/phase1 [--arms a,b]

Per arm (``ARMS`` below holds each arm's hyper-parameters in one table):
  * training goes through the harness trainer (ionllama.train.trainer) with a *time-based* schedule:
    warmup, phases (entropy model -> main -> joint) and the cosine decay follow the fraction of the
    budget spent, so every arm ends its schedule exactly when its budget is spent (``TimeBudgetPlan``);
    training time excludes evaluation and checkpointing (the trainer's own accounting);
  * val BPB is measured at ``--curve_points`` times on the first ``--curve_eval_bytes`` val bytes (for
    the curves), then once on the full val split (or the first ``--eval_bytes``: the same bytes for
    every arm, byte models and the BPE model alike, see ionllama/data/bpe.py);
  * <out>/<arm>/metrics.jsonl (the trainer's records + cumulative training FLOPs), config.json and
    final.json (val/test/out-of-domain BPB, params, bytes/s, bytes/patch, FLOPs, time, command,
    device, date, git commit). An arm with final.json is skipped (refused if it finished with other
    training settings); an interrupted arm resumes from <ckpt_dir>/<arm>/latest.pt (checkpoints stay
    out of git).
Then <out>.md's table section, <out>.json and the plots (val BPB vs training time and vs FLOPs).

Training FLOPs (second view; ionllama/model/flops.py): 6 x matmul parameters per position (forward +
backward), + attention 12 x d x keys-per-query per layer, per position; per byte = per position /
(bytes per position): 1 for byte models, bytes/token for BPE, and for ionLlama the byte-level parts
count per byte and the latent parts per patch (the measured bytes/patch of each logged window). The
frozen entropy model counts 2 per parameter, the entropy phase 6 x its parameters. MambaByte adds the
chunked scan's matmuls (``ssd_flops_per_position``). Embedding lookups, norms and elementwise ops are
not counted.

``--stage tasks`` fine-tunes the task arms (best ionLlama arm, dense, bpe) on identical task examples
for identical steps (ionllama/data/tasks.py; prompt and answer encoded separately for BPE) and scores
the held-out test split with the benchmark's task evaluation (exact match, 95 % Wilson CIs).
"""
from __future__ import annotations

from .budget import TimeBudgetPlan, make_budget_trainer, warm_up  # noqa: F401
from .cli import build_parser, main  # noqa: F401
from .flops import add_flops, ssd_flops_per_position, train_flops_per_byte  # noqa: F401

# The public names, as `ionllama.experiment` had them when it was one module:
from .matrix import (  # noqa: F401
    ARMS,
    ION_SWEEP_VARIANTS,
    JOINT_FRAC,
    MATRICES,
    MODEL_KEYS,
    NEVER,
    NOMINAL_STEPS,
    SWEEP_VARIANTS,
    TASK_ARMS,
    WARMUP_FRAC,
    parse_overrides,
    sweep_variants,
    variant_parts,
    variant_spec,
)
from .report import (  # noqa: F401
    EQUAL_VIEWS,
    bpb_at,
    collect,
    equal_at,
    equal_at_markdown,
    plot_curves,
    table_markdown,
    tasks_markdown,
    write_report,
)
from .runner import Runner  # noqa: F401
from .tasks import pack_examples, run_task_stage, task_batch, task_examples  # noqa: F401

