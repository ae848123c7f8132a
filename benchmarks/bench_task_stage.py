"""How fast is the experiment's task stage, eager against torch.compile'd? (issue #11, question 4)

The Q4 task rows fine-tune for 3,000 steps of 64 examples in 256-byte rows; on the H200 that took 175-205 s
(`docs/results/phase1-tasks-best-*-sg/*/tasks.json`, "seconds"), ~60-70 ms per step for a model whose pretraining
step at 64 x 1,024 bytes takes ~25 ms: the stage waits on the host. Seeds spread addition by ~0.12 because the
2-digit jump comes at a seed-dependent step, so a longer stage (every seed past the jump) is the next lever, and it
has to fit a device call. This script times the stage's own loop (`ionllama.experiment.tasks.train_on_tasks`, the
same batches) both ways on random weights of a run's architecture, and checks that the two give close losses.

    PYTHONPATH=. python benchmarks/bench_task_stage.py \\
        --model_config docs/results/phase1-tasks-best-dense-sg/ionllama_fixed/config.json --steps 300 --out OUT

Writes OUT/bench_task_stage.json: ms per step after the warm-up steps, for eager and compiled, and the loss of each
way's last logged step.
"""
from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generation import add_model_config_arg, model_config_from  # noqa: E402

from ionllama import build_model, create_model  # noqa: E402
from ionllama.devices import resolve_device  # noqa: E402
from ionllama.errors import OneLineParser, UserError, check_ranges, cli_entry  # noqa: E402
from ionllama.fsutil import atomic_write, ready_out_dir  # noqa: E402
from ionllama.eval.benchmark import device_name, git_commit  # noqa: E402
from ionllama.experiment.tasks import (  # noqa: E402
    captured_stage_problem, compiled_stage, task_batch, task_examples, train_on_tasks)


def add_stage_args(ap, steps: int) -> None:
    """The model and task-stage shape flags this script and task_step_graph_equal.py share."""
    ap.add_argument("--size", default="small")
    add_model_config_arg(ap)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--batch", type=int, default=64, help="task examples per step (the experiment's --task_batch)")
    ap.add_argument("--row_len", type=int, default=256, help="the experiment's --task_seq_len")


def build(args):
    torch.manual_seed(0)
    cfg = model_config_from(args.model_config) if args.model_config else None
    model = build_model(cfg) if cfg is not None else create_model(args.size)
    if hasattr(model, "freeze_entropy"):
        model.freeze_entropy(True)  # as the experiment's task stage (run_task_stage) does
    return model.to(args.device)


def time_way(args, compiled: bool) -> dict:
    model = build(args)
    batches = [task_batch(model, task_examples(1, step, args.batch), args.row_len) for step in range(args.steps)]
    shapes, captured = {}, False
    if compiled and args.fixed_rows:  # as the experiment's compiled stage: one shape, one compile
        batches, fwd, shapes = compiled_stage(model, batches)
        if args.step_graph:  # as --task_step_graph: the whole step one CUDA graph, where the shapes allow it
            problem = captured_stage_problem(model, shapes, args.row_len, args.device)
            if problem:
                raise UserError(f"--step_graph: {problem}; time this model without it")
            captured = True
    else:
        fwd = torch.compile(model, dynamic=True if args.dynamic else None) if compiled else model
    graphs_before = dynamo_graphs()
    marks = {}

    def batch_of_step(step):
        if step == args.warmup:  # the steps before include compiling; the rate is taken after them
            torch.cuda.synchronize() if args.device.startswith("cuda") else None
            marks["t"] = time.perf_counter()
        return batches[step]

    t0 = time.perf_counter()
    cuda = args.device.startswith("cuda")
    losses, seconds = train_on_tasks(model, torch.device(args.device), torch.bfloat16 if cuda else None,
                                     args.steps, 1e-3, batch_of_step, log_every=50, forward=fwd, step_graph=captured)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    timed = args.steps - args.warmup
    return {"ms_per_step": 1e3 * (time.perf_counter() - marks["t"]) / timed, "timed_steps": timed,
            "warmup_steps": args.warmup, "total_s": time.perf_counter() - t0, "last_loss": losses[-1],
            "dynamo_graphs": dynamo_graphs() - graphs_before, "step_graph": captured, **shapes}


def dynamo_graphs() -> int:
    """Graphs dynamo has compiled in this process so far: each new shape that recompiles adds to it."""
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])


@cli_entry
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = OneLineParser(description=__doc__.split("\n")[0])
    add_stage_args(ap, steps=300)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--fixed_rows", action="store_true",
                    help="compiled: as the experiment's compiled stage (tasks.compiled_stage): every batch padded to the "
                         "largest row count, one latent length for space patching; without it the batches as packed")
    ap.add_argument("--step_graph", action="store_true",
                    help="with --fixed_rows: the whole step captured as one CUDA graph (the experiment's "
                         "--task_step_graph); only the compiled way uses it")
    ap.add_argument("--dynamic", action="store_true",
                    help="torch.compile(model, dynamic=True): shapes symbolic from the first compile, not the second")
    ap.add_argument("--ways", nargs="+", choices=("eager", "compiled"), default=["eager", "compiled"])
    ap.add_argument("--out", default="out")
    args = ap.parse_args(argv)
    # every input is checked before a model is built or a step runs (a traceback after minutes of compiling, or a
    # --batch 0 stage timed and written as a result)
    check_ranges(args, {"steps": 2, "warmup": 1, "batch": 1, "row_len": 2})
    if args.step_graph and not (args.fixed_rows and "compiled" in args.ways):
        raise UserError("--step_graph times the compiled stage with --fixed_rows; add --fixed_rows (and the compiled "
                        "way)")
    if not 0 < args.warmup < args.steps:
        raise UserError("--warmup must be between 0 and --steps; pass e.g. --steps 300 --warmup 50")
    args.device = str(resolve_device(args.device))
    if args.step_graph and not args.device.startswith("cuda"):
        raise UserError("--step_graph captures CUDA graphs; pass --device cuda (on a CPU there is nothing to capture)")
    if args.model_config:
        model_config_from(args.model_config)
    else:
        create_model(args.size, model="dense", d_model=8, n_layers=1, n_heads=1)  # (an unknown --size: one line)
    out = ready_out_dir(args.out)
    res = {way: time_way(args, way == "compiled") for way in args.ways}
    if len(res) == 2:
        res["speedup"] = res["eager"]["ms_per_step"] / res["compiled"]["ms_per_step"]
    res.update({"args": vars(args), "command": "python3 benchmarks/bench_task_stage.py " + shlex.join(argv),
                "torch": torch.__version__, "commit": git_commit(),
                "device_name": device_name(args.device),
                "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())})
    atomic_write(out / "bench_task_stage.json", json.dumps(res, indent=1))
    for way in args.ways:
        r = res[way]
        rows = (" (fixed rows" + (", captured step" if r.get("step_graph") else "") + ")") if args.fixed_rows else ""
        print(f"{way:9s} {r['ms_per_step']:.1f} ms/step over {r['timed_steps']} steps{rows}; last loss "
              f"{r['last_loss']['loss']:.4f}; {r['total_s']:.0f} s in all; {r['dynamo_graphs']} dynamo graphs")
    if "speedup" in res:
        print(f"speedup {res['speedup']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
