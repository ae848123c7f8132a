"""`ionllama experiment`'s command line."""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

import torch

from ..errors import OneLineParser, UserError, check_not_blank, check_ranges, check_seed, cli_entry
from ..fsutil import probe_writable, remove_if_empty
from . import __doc__ as _PACKAGE_DOC  # the package's docstring: what `--help` says first
from ._common import _log, _read_json
from .matrix import MATRICES, TASK_ARMS
from .report import write_report
from .runner import Runner

# numeric flags' least values, checked before anything trains (the trainer would only refuse them when the
# first arm starts, after the data is prepared; a negative --curve_points or --deadline_s was taken silently)
AT_LEAST = {"curve_points": 1, "curve_eval_bytes": 1, "eval_bytes": 1, "eval_batch_size": 1, "also_eval_seq_len": 2,
            "seq_len": 2, "batch_size": 1, "grad_accum": 1, "log_interval": 1, "arm_overhead_s": 0,
            "task_steps": 1, "task_batch": 1, "task_seq_len": 8, "task_n": 1, "task_eval_s": 0,
            "checkpoint_every_s": 0}  # (0: only when stopped or signalled, as its help says; it was refused)
ABOVE_ZERO = ("budget_s", "sweep_budget_s", "deadline_s", "task_lr", "task_time_s")
STAGE_ORDER = ("prepare", "sweep", "pretrain", "tasks", "report")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="ionllama experiment", description=_PACKAGE_DOC.split("\n\n")[0],
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--matrix", default="phase1", choices=sorted(MATRICES),
                   help="which arm table: phase1 (GPU sizes) or cpu_tiny (every arm at the tiny size)")
    p.add_argument("--arms", default=None, help="comma-separated subset of the matrix's arms (default: all)")
    p.add_argument("--stage", default="pretrain",
                   help="comma list of prepare | sweep | pretrain | tasks | report, run in that order (the report "
                        "is rebuilt after every invocation); or compare alone: the table, equal-FLOPs/-steps views "
                        "and plots of the --runs folders (from any results folders) written as <--out>.md / .json / "
                        "<--out>/")
    p.add_argument("--runs", nargs="+", default=None,
                   help="with --stage compare: run folders holding final.json (and metrics.jsonl[.gz]), e.g. "
                        "docs/results/phase1-patch3/ionllama_fixed; each is named <its results folder>/<run>")
    p.add_argument("--budget_s", type=float, default=420.0, help="training seconds per arm (evaluation excluded)")
    p.add_argument("--sweep", action="store_true", help="same as adding 'sweep' to --stage")
    p.add_argument("--sweep_budget_s", type=float, default=None, help="budget of each sweep run (default --budget_s)")
    p.add_argument("--sweep_variants", default=None,
                   help="comma-separated subset of the sweep's variants to train here (default: all); e.g. half an "
                        "arm's sweep on each of two GPUs. 'a+b' composes variants of different knobs (shallow+lr2x)")
    p.add_argument("--from_sweep", action="store_true", help="train each arm with its best sweep variant (val BPB)")
    p.add_argument("--sweep_dir", default=None,
                   help="the sweep's folder (default: <out>/sweep); e.g. --from_sweep with another --out reads the "
                        "picks of docs/results/phase1-sweep/sweep")
    p.add_argument("--out", default="docs/results/phase1", help="results folder (committed)")
    p.add_argument("--title", default=None,
                   help="the report page's heading (default '# <matrix>' or '# comparison'; a heading edited by "
                        "hand is kept)")
    p.add_argument("--ckpt_dir", default="checkpoints/phase1", help="checkpoints (git-ignored)")
    p.add_argument("--deadline_s", type=float, default=None,
                   help="wall-clock seconds this invocation may use, from its process start: no arm is started "
                        "that would not finish, and one running late stops training in time for its final "
                        "evaluation (a row marked cut; the same command run again continues it to the full budget)")
    p.add_argument("--checkpoint_every_s", type=float, default=120.0,
                   help="save latest.pt at the first curve point after this many training seconds (0: only when "
                        "stopped or signalled)")
    p.add_argument("--arm_overhead_s", type=float, default=None,
                   help="expected seconds per arm beyond the budget (data, compile, evaluation) for --deadline_s "
                        "(default 120); given, also the seconds a training arm keeps for its final evaluation "
                        "until a curve point has timed one (default ~60 s)")
    g = p.add_argument_group("data and evaluation")
    g.add_argument("--data_path", default=None, help="e.g. '../shared/data/gutenberg/gutenberg-{split}.jsonl.xz'")
    g.add_argument("--dataset", default="builtin", help="used without --data_path")
    g.add_argument("--data_dir", default="data_cache")
    g.add_argument("--text_field", default="text",
                   help="field holding the text in jsonl / parquet / hub rows, of --data_path and --eval_data")
    g.add_argument("--eval_bytes", type=int, default=None, help="cap on scored bytes per final evaluation (all arms)")
    g.add_argument("--curve_eval_bytes", type=int, default=2_000_000, help="val bytes per curve point")
    g.add_argument("--curve_points", type=int, default=8, help="val evaluations during training")
    g.add_argument("--final_test", action="store_true", help="also evaluate the test split ({split} = test)")
    g.add_argument("--eval_data", action="append", default=None,
                   help="extra evaluation data (e.g. ../shared/data/wikipedia/wikipedia-val.jsonl.xz); repeatable")
    g.add_argument("--eval_batch_size", type=int, default=None)
    g.add_argument("--also_eval_seq_len", type=int, default=None,
                   help="final evaluation: also score val in windows of this many bytes (token arms: / "
                        "token_seq_div), as 'val@N' (e.g. 1024 for arms trained with a longer --seq_len)")
    g = p.add_argument_group("training (same for every arm)")
    g.add_argument("--seq_len", type=int, default=1024, help="bytes per window (token arms: / token_seq_div)")
    g.add_argument("--batch_size", type=int, default=64)
    g.add_argument("--grad_accum", type=int, default=1)
    g.add_argument("--mixed_precision", choices=("bf16", "fp16", "none"), default=None)
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile (default: on with CUDA)")
    g.add_argument("--compile_mode", choices=("default", "reduce-overhead"), default="default",
                   help="with --compile: reduce-overhead adds CUDA graphs (see ionllama train --help)")
    g.add_argument("--step_graph", action="store_true",
                   help="replay each arm's training step as one CUDA graph (ionllama train --step_graph), for the "
                        "arms that allow it (all: entropy and space patching as the two-stage step; their joint "
                        "phase runs uncaptured)")
    g.add_argument("--device", default="auto")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--log_interval", type=int, default=10)
    g.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                   help="compile / initialise on real batches before the clock starts (default on)")
    g.add_argument("--override", action="append", default=None,
                   help="KEY=VALUE applied to every arm (e.g. d_model=64 n_layers=2 for a smoke test)")
    g = p.add_argument_group("task stage")
    g.add_argument("--task_arms", default=None, help=f"default: {','.join(TASK_ARMS)}")
    g.add_argument("--task_steps", type=int, default=600)
    g.add_argument("--task_batch", type=int, default=64, help="task examples per step")
    g.add_argument("--task_lr", type=float, default=3e-4)
    g.add_argument("--task_seq_len", type=int, default=256, help="bytes per packed row (tokens: half)")
    g.add_argument("--task_n", type=int, default=100, help="test examples per task (and per digit count)")
    g.add_argument("--task_compile", action="store_true",
                   help="torch.compile the task stage's forward (on a GPU the eager stage waits on the host; "
                        "benchmarks/bench_task_stage.py measures both)")
    g.add_argument("--task_step_graph", action="store_true",
                   help="with --task_compile: the task stage's whole step (forward, backward, AdamW) captured as one "
                        "CUDA graph and replayed, where the arm's shapes allow it (not entropy patching: the log says "
                        "so and that arm runs without it); benchmarks/bench_task_stage.py --step_graph times it")
    g.add_argument("--task_time_s", type=float, default=240.0, help="expected seconds per task arm (--deadline_s)")
    # 150, not 60: the full best row (local layers) scored in 86 s on an H200, and on an H100 its scoring was killed
    # by the call's time limit with the 60 s kept (phase1-tasks-long-ng23-s2.md): no message and no scores; the
    # 1-byte-patch row with local layers scored in 121 s on an H200 (phase1-tasks-long-byte1-s1/log_gpu0.txt)
    g.add_argument("--task_eval_s", type=float, default=150.0,
                   help="with --deadline_s: seconds kept after the task stage's training for its held-out scoring, "
                        "which runs after it (the log prints what scoring took; set this from it: 86-121 s for a "
                        "model with local layers on an H200, 6-86 s without)")
    return p


@cli_entry
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = build_parser().parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        # each rank ran the whole matrix into the same folders, its trainer joining the others' in DDP (an audit)
        raise UserError("ionllama experiment runs its arms in one process; launch it with python, not torchrun "
                        "(several GPUs: one experiment process per GPU, as scripts/gpu_phase1_parallel.sh does)")
    if a.compile is None:
        a.compile = torch.cuda.is_available() and a.device in ("auto", "cuda") or a.device.startswith("cuda")
    check_ranges(a, AT_LEAST, ABOVE_ZERO)
    check_seed(a.seed)
    if a.task_step_graph and not a.task_compile:  # the graph needs the compiled stage's one shape per step
        raise UserError("--task_step_graph needs --task_compile (every step one shape); add --task_compile")
    check_not_blank(a, ("out", "ckpt_dir", "data_dir", "sweep_dir"))
    stages = [s.strip() for s in a.stage.split(",") if s.strip()]
    if not stages and not a.runs and not a.sweep:  # --stage '' did nothing, exit 0, and left an empty --out folder
        raise UserError(f"--stage {a.stage!r} names no stage; use prepare, pretrain, sweep, tasks, report or compare")
    if "compare" in stages or a.runs:
        return compare(a, stages, argv)
    if a.sweep and "sweep" not in stages:
        stages.insert(0, "sweep")
    bad = [s for s in stages if s not in STAGE_ORDER]
    if bad:
        raise UserError(f"unknown --stage {bad}; use prepare, pretrain, sweep, tasks, report (or compare alone)")
    # in their one sensible order, whatever the order typed: `--stage pretrain,sweep --from_sweep` trained every arm
    # at its base settings before the sweep it was to be picked from (exit 0, the row then refused by the same
    # command), and `tasks,pretrain` skipped every task arm as "not pretrained yet"
    stages = sorted(set(stages), key=STAGE_ORDER.index)
    out, made = Path(a.out), not Path(a.out).exists()
    runner = names = None
    try:
        runner, names = _checked_runner(a, argv, stages)
        for s in stages:
            if s == "prepare":
                runner.prepare()
            elif s == "sweep" or (s == "report" and runner.sweep_dir.is_dir() and not a.sweep_dir):
                # --stage report rebuilds the sweep table too: one process per GPU each writes it for its own arms;
                # not another folder's sweep read through --sweep_dir (its page came to name this command)
                if s == "sweep":
                    runner.sweep()
                write_report(runner.sweep_dir, [f"{n}~{v}" for n in names for v in runner.trained_variants(n)],
                             runner.command, label=f"{a.matrix} sweep")
            elif s == "pretrain":
                if "prepare" not in stages:
                    runner.prepare(eval_sets=False)  # data first, so --deadline_s sees the arms' own time only
                runner.pretrain()
            elif s == "tasks":
                runner.tasks()
        write_report(runner.out, list(runner.matrix), runner.command, label=a.matrix, title=a.title, expected=names)
        return 0
    except (KeyboardInterrupt, SystemExit):
        # the report is rebuilt after every invocation (--help), an interrupted one too: its finished arms' rows
        # were left out of the page until the next run (a second ^C stops this as well). A signal during an arm's
        # training arrives as the trainer's SystemExit(128 + signal), not as KeyboardInterrupt
        if runner is not None and any(out.glob("*/final.json")):
            _log("interrupted: rebuilding the report of the finished arms")
            _rebuild_report(runner, a, names)
        raise
    except UserError:
        # a refused command leaves no empty --out behind (Runner makes it early, to fail on an unwritable path
        # before any arm trains); a folder with anything in it is kept, and its report rebuilt (an arm refused
        # after others finished left them off the page)
        if made:
            remove_if_empty(out)
        elif runner is not None and any(out.glob("*/final.json")):
            _rebuild_report(runner, a, names)
        raise


def _rebuild_report(runner: Runner, a: argparse.Namespace, names) -> None:
    """The report of the finished arms, on the way out of a stopped or refused invocation: a failure here must not
    hide the reason it stopped."""
    try:
        write_report(runner.out, list(runner.matrix), runner.command, label=a.matrix, title=a.title, expected=names)
    except (OSError, UserError, ValueError) as e:
        _log(f"note: the report was not rebuilt ({e})")


def _checked_runner(a: argparse.Namespace, argv: list[str], stages: list[str]) -> tuple[Runner, list[str]]:
    """The runner and its arm names, every input checked before anything trains."""
    out = Path(a.out)
    _check_summary_is_ours(out)
    if stages == ["report"] and not any(out.glob("*/final.json")) and not any(out.glob("sweep/*/final.json")):
        # a mistyped --out wrote an empty report (and made the folder) with exit 0
        raise UserError(f"--stage report: no finished arm under {out} (no <arm>/final.json); check --out")
    runner = Runner(a, argv)
    if a.from_sweep and "sweep" not in stages and not runner.sweep_dir.is_dir():
        # without this the arms trained their base settings without a word
        raise UserError(f"--from_sweep: no sweep folder {runner.sweep_dir}; pass --sweep_dir (e.g. "
                        "docs/results/phase1-sweep/sweep) or run --stage sweep first")
    runner.eval_sets()  # validate paths before any training
    if {"pretrain", "sweep"} & set(stages):  # an unwritable one was a traceback after the data was prepared
        made = not Path(a.ckpt_dir).exists()
        try:
            probe_writable(a.ckpt_dir)
        except OSError as e:
            raise UserError(f"cannot write --ckpt_dir {a.ckpt_dir} ({e.strerror or e}); pass a writable folder") \
                from None
        finally:
            if made:  # made again by the first arm: a refused command leaves no folder behind
                remove_if_empty(Path(a.ckpt_dir))
    names = runner.arm_names()
    if "pretrain" in stages:
        _check_arm_configs(runner, names)
    if "tasks" in stages:
        task_arms = [s.strip() for s in (a.task_arms or ",".join(TASK_ARMS)).split(",") if s.strip()]
        for arm in task_arms:
            if arm not in runner.matrix:  # found only when the task stage began, after pretraining
                raise UserError(f"--task_arms: unknown arm '{arm}'; choose from {', '.join(runner.matrix)}")
        from .tasks import check_task_row_len, longest_task_example

        check_task_row_len(a.task_seq_len, longest_task_example(a.seed, a.task_steps, a.task_batch),
                           [arm for arm in task_arms if runner.matrix[arm].get("model") == "bpe"])
    return runner, names


def _check_arm_configs(runner: Runner, names: list[str]) -> None:
    """Each arm's trainer flags and model config, checked before the first arm trains: an --override out of
    range (n_layers=-1, a d_model the heads do not split) was found only when its arm started, after the
    earlier arms had trained."""
    from ..train.cli import build_train_parser
    from ..train.trainer import model_config_from_args

    for arm in names:
        parser = build_train_parser()

        def reject(message, arm=arm):
            raise UserError(f"arm {arm}: the trainer rejects its flags: {message}; check --override")

        parser.error = reject
        targs = parser.parse_args(runner.trainer_argv(arm, runner.spec_of(arm), runner.a.budget_s))
        try:
            model_config_from_args(targs)
        except UserError as e:
            raise UserError(f"arm {arm}: {e}") from None


def _check_summary_is_ours(out: Path) -> None:
    """<out>.json is the report's summary: a user's own file of that name was replaced without a word."""
    summary = out.parent / f"{out.name}.json"
    if not summary.is_file():
        return
    data = _read_json(summary)
    if not (isinstance(data, dict) and "arms" in data and "matrix" in data):
        raise UserError(f"{summary} is not a report summary of `ionllama experiment` (a file of yours?) and the "
                        "report would write its summary there; pass another --out")


def compare(a: argparse.Namespace, stages: list[str], argv: list[str]) -> int:
    """--stage compare: a report over finished runs of different results folders (nothing is trained)."""
    if stages != ["compare"] or not a.runs:
        raise UserError("--stage compare takes --runs DIR [DIR ...] and no other stage; the other stages take no "
                        "--runs")
    runs = {}
    for r in a.runs:
        d = Path(r)
        if not d.is_dir():
            raise UserError(f"--runs: {d} does not exist or is not a folder; give a run folder such as "
                            "docs/results/phase1-patch3/ionllama_fixed")
        if not (d / "final.json").is_file():
            raise UserError(f"--runs: no final.json in {d}; give a run folder such as "
                            "docs/results/phase1-patch3/ionllama_fixed")
        name = f"{d.resolve().parent.name}/{d.name}"
        if name in runs:
            raise UserError(f"--runs: {name} given twice")
        runs[name] = d
    own = sorted(f.parent.name for f in Path(a.out).glob("*/final.json"))
    if own:  # an experiment's results folder: its report (.md, .json, table, plots) would be replaced by this one
        raise UserError(f"--out {a.out} is an experiment's results folder (arms {', '.join(own[:4])}); give the "
                        "comparison its own --out, e.g. docs/results/compare-NAME")
    if (Path(a.out) / "final.json").exists():  # a run folder: plots and table.md would land among its files
        raise UserError(f"--out {a.out} is a run folder (it holds final.json); give the comparison its own --out, "
                        "e.g. docs/results/compare-NAME")
    out = Path(a.out)
    _check_summary_is_ours(out)
    made = not out.exists()
    try:  # the page and its .json go next to --out, the plots into it: both must be writable before any work
        probe_writable(out)
        probe_writable(out.parent)
    except OSError as e:
        if made:
            remove_if_empty(out)
        raise UserError(f"cannot write --out {a.out} ({e.strerror or e}); pass a writable folder") from None
    write_report(out, runs, "ionllama experiment " + shlex.join(argv), label="comparison", title=a.title)
    return 0


if __name__ == "__main__":
    sys.exit(main())
