"""Does the captured task step (--task_step_graph) train to the plain compiled stage's losses on a GPU?

The forty-sixth session timed the two ways (benchmarks/bench_task_stage.py) and their step-399 losses differed
(1.3117 against 1.3580) with dropout 0. Same weights, same batches, same step math (tests/test_tasks.py checks that
eagerly on a CPU) leaves float arithmetic: fused AdamW with device-side step counters, bf16 autocast inside a graph,
and atomics in backward kernels. A difference from the first steps on would be a bug; one that grows from ~1e-6 is
the chaotic divergence of two float trainings, which the control shows: the plain way run twice.

    PYTHONPATH=. python3 benchmarks/task_step_graph_equal.py --model_config RUN/config.json --steps 400 --out OUT
    ... --precisions bf16 --repeats 3 --eager_step      # more samples of each way, and the third way

Writes OUT/task_step_graph_equal.json: every step's loss for each run, per pair the largest relative loss
difference over steps 0-9, 10-99 and 100 on, and each run's mean loss over its last 50 steps (tail_mean).
--repeats N runs the set N times (names get _2, _3, ...): the forty-seventh and forty-eighth sessions found the
captured run's bf16 tail mean the highest of its set three times out of three, which one set cannot tell from the
spread. --eager_step adds a run of StepGraph's step code and capturable fused AdamW without the capture (replay off):
if it trains like the captured run, the optimizer path, not the graph, makes the difference.
"""
from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generation import model_config_from  # noqa: E402
from bench_task_stage import add_stage_args, build  # noqa: E402

from ionllama.devices import resolve_device  # noqa: E402
from ionllama.errors import OneLineParser, UserError, check_ranges, cli_entry  # noqa: E402
from ionllama.eval.benchmark import device_name, git_commit  # noqa: E402
from ionllama.experiment.tasks import compiled_stage, task_batch, task_examples, train_on_tasks  # noqa: E402
from ionllama.fsutil import atomic_write, ready_out_dir  # noqa: E402

WINDOWS = ((0, 10), (10, 100), (100, None))


TAIL = 50  # steps in tail_mean


def train(args, graph: bool, amp, replay: bool = True) -> list[float]:
    """Every step's loss of one task stage from seed-0 weights (the compiled stage's fixed shapes); graph: the step
    through StepGraph, captured and replayed unless replay is False."""
    model = build(args)  # seed 0, entropy model frozen as the experiment's task stage does
    raw = [task_batch(model, task_examples(1, step, args.batch), args.row_len) for step in range(args.steps)]
    batches, fwd, _ = compiled_stage(model, raw)
    torch.manual_seed(1)
    rows, _ = train_on_tasks(model, torch.device(args.device), amp, args.steps, 1e-3, batches.__getitem__,
                             log_every=1, forward=fwd, step_graph=graph, replay=replay)
    return [r["loss"] for r in rows]


def max_rel(a: list[float], b: list[float]) -> dict:
    out = {}
    for lo, hi in WINDOWS:
        pairs = list(zip(a[lo:hi], b[lo:hi]))
        if pairs:
            out[f"{lo}-{'' if hi is None else hi - 1}"] = max(abs(x - y) / max(abs(y), 1e-12) for x, y in pairs)
    return out


@cli_entry
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = OneLineParser(description=__doc__.split("\n")[0])
    add_stage_args(ap, steps=400)
    ap.add_argument("--precisions", nargs="+", choices=("bf16", "fp32"), default=["bf16", "fp32"])
    ap.add_argument("--repeats", type=int, default=1, help="run each precision's set this many times")
    ap.add_argument("--eager_step", action="store_true",
                    help="add a run of StepGraph's step code and optimizer without the capture")
    ap.add_argument("--out", default="out")
    args = ap.parse_args(argv)
    check_ranges(args, {"steps": 2, "batch": 1, "row_len": 2, "repeats": 1})
    args.device = str(resolve_device(args.device))
    if not args.device.startswith("cuda"):
        raise UserError("the captured step needs a GPU; pass --device cuda (tests/test_tasks.py covers the CPU)")
    if args.model_config:
        model_config_from(args.model_config)
    out = ready_out_dir(args.out)
    runs, pairs = {}, {}

    def write():  # after every run: a call cut by its time limit keeps what finished
        tail = {k: sum(v[-TAIL:]) / len(v[-TAIL:]) for k, v in runs.items()}
        res = {"pairs": pairs, "tail_mean": tail, "losses": runs, "args": vars(args),
               "command": "python3 benchmarks/task_step_graph_equal.py " + shlex.join(argv), "torch": torch.__version__,
               "commit": git_commit(), "device_name": device_name(args.device),
               "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
        atomic_write(out / "task_step_graph_equal.json", json.dumps(res, indent=1))

    ways = [("plain", False, True), ("plain_again", False, True), ("graph", True, True)]
    ways += [("eager_step", True, False)] if args.eager_step else []
    for prec in args.precisions:
        amp = torch.bfloat16 if prec == "bf16" else None
        for rep in range(1, args.repeats + 1):
            sfx = "" if rep == 1 else f"_{rep}"
            for way, graph, replay in ways:
                name = f"{prec}_{way}{sfx}"
                t0 = time.perf_counter()
                runs[name] = train(args, graph, amp, replay)
                print(f"{name}: loss step 0 {runs[name][0]:.5f}, step {args.steps - 1} {runs[name][-1]:.5f}, "
                      f"mean of the last {TAIL} {sum(runs[name][-TAIL:]) / len(runs[name][-TAIL:]):.4f} "
                      f"({time.perf_counter() - t0:.0f} s)", flush=True)
                write()
            for other, _, _ in ways[1:]:
                key = f"{prec}: plain vs {other}{sfx}"
                pairs[key] = max_rel(runs[f"{prec}_plain{sfx}"], runs[f"{prec}_{other}{sfx}"])
                print(f"{key}: largest relative loss difference "
                      + ", ".join(f"steps {k} {v:.2e}" for k, v in pairs[key].items()))
            write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
