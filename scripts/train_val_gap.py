"""Training BPB at the end of a run against its final val BPB, from committed run folders (metrics.jsonl[.gz]).

    python scripts/train_val_gap.py docs/results/phase1-sweep/bpe docs/results/phase1-dropout/bpe ...

Training BPB: the mean of the language model's logged training rows over the last `--tail` share of them, each
row weighted by the steps it averages (training batches, in training mode: with dropout active where the run
used it, so not comparable across dropout settings). A large positive gap with a val curve that has stopped
falling points at overfitting; a small one at a compute limit.

    python scripts/train_val_gap.py RUN_A RUN_B --steps 2000:2200

--steps A:B averages the training rows of steps A..B instead (both ends included): runs of one config that stopped
at different step counts (a 75 s budget on an H100 and on an H200) compared at the same steps and data order. Their
learning rates there differ a little, since the cosine schedule follows each run's own time budget.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ionllama.errors import UserError, cli_entry  # noqa: E402
from ionllama.eval.plots import NOT_MAIN_PHASES  # noqa: E402
from ionllama.train.metrics import metrics_file, read_metrics  # noqa: E402


def gap_row(run: Path, tail: float, steps: tuple[int, int] | None = None) -> dict:
    if not metrics_file(run):
        raise UserError(f"{run}: no metrics.jsonl or metrics.jsonl.gz; pass a run folder "
                        f"(e.g. docs/results/phase1-dropout/bpe)")
    rows = read_metrics(run)
    train = [r for r in rows if "bpb" in r and "val_bpb" not in r]
    # a row is the mean of the steps since the row before it (of any phase): its weight. A run's last window is cut
    # (1 step after 10-step rows) and weighed as a whole row
    steps_of = {id(r): max(1, r["step"] - (p["step"] if p else 0)) for p, r in zip([None, *train], train)}
    evals = [r for r in rows if "val_bpb" in r]
    if not train or not evals:
        raise UserError(f"{run}: needs logged training rows and at least one val evaluation")
    # the language model's rows: an entropy-patching run's first steps log the entropy model's own bpb
    lm = [r for r in train if str(r.get("phase", "")).lower() not in NOT_MAIN_PHASES]
    if steps is not None:
        last = [r for r in lm if steps[0] <= r["step"] <= steps[1]]
        if not last:
            raise UserError(f"{run}: no training row in steps {steps[0]}:{steps[1]} (it logged steps "
                            f"{train[0]['step']}-{train[-1]['step']}); pass a window inside them")
    else:
        last = lm[int(len(lm) * (1 - tail)):] or lm[-1:]
        if not last:
            raise UserError(f"{run}: no training row of the language model (only the entropy model's)")
    w = [steps_of[id(r)] for r in last]
    train_bpb = sum(r["bpb"] * k for r, k in zip(last, w)) / sum(w)
    best = min(r["val_bpb"] for r in evals)
    return dict(run=str(run), train_bpb=train_bpb, train_rows=len(last), val_final=evals[-1]["val_bpb"], val_best=best,
                gap=evals[-1]["val_bpb"] - train_bpb)


@cli_entry
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--tail", type=float, default=0.05, help="share of the last training rows averaged")
    ap.add_argument("--steps", default=None, metavar="A:B",
                    help="average the training rows of steps A..B instead of the tail (same steps across runs)")
    a = ap.parse_args(argv)
    if not 0 < a.tail <= 1:
        raise UserError(f"--tail {a.tail} must be in (0, 1]")
    steps = None
    if a.steps is not None:
        m = re.fullmatch(r"(\d+):(\d+)", a.steps)
        if not m or int(m[1]) > int(m[2]):
            raise UserError(f"--steps {a.steps!r}: give two step numbers A:B with A <= B, e.g. --steps 2000:2200")
        steps = (int(m[1]), int(m[2]))
    rows = [gap_row(run, a.tail, steps) for run in a.runs]  # every folder checked before anything is printed
    what = f"steps {steps[0]}-{steps[1]}" if steps else f"last {a.tail:.0%} of rows"
    print(f"| run | training BPB ({what}) | rows | final val BPB | best val BPB | gap (val - train) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['train_bpb']:.4f} | {r['train_rows']} | {r['val_final']:.4f} | {r['val_best']:.4f} "
              f"| {r['gap']:+.4f} |")


if __name__ == "__main__":
    main()
