"""The Phase-1 rows planned for the device (issue #11), and the exact `run` command for one of them.

    python scripts/phase1_rows.py                       # list the rows
    python scripts/phase1_rows.py "2K windows, dense, seed 1" --res phase1-dense-seq2048-seed1
    python scripts/phase1_rows.py "row A" "row B" --res a --res b --t 250 --t 300   # one call, one after the other

Why: a row's arm and flags were retyped by hand into the device call, and once the arm was wrong (the
twenty-eighth session ran `ionllama` for `ionllama_fixed`, a whole 10-minute call). Here the rows are one table,
tests/test_gpu_scripts.py checks every row against the experiment's parser and the model config, and the device
command is printed from the same table, so what runs is what was tested.
"""
from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ionllama.errors import OneLineParser, UserError, check_ranges, cli_entry  # noqa: E402

SWEPT = "--from_sweep --step_graph --sweep_dir docs/results/phase1-sweep/sweep"
# the best row's overrides (phase1-poolattn.md); the Q2 / Q3 rows add one key to them
BEST = "latent_shift=completed,dropout=0.1,fixed_patch_size=3,pooling=attention"
WIN2K = "--seq_len 2048 --batch_size 32 --also_eval_seq_len 1024"

def _task_row(overrides: str, seed: int = 1, step_graph: bool = False, task_steps: int = 3000,
              task_compile: bool = False, arm: str = "ionllama_fixed", task_graph: bool = False,
              task_time: int | None = None, task_eval: int = 30) -> dict:
    """A Q4 row: 75 s of pretraining (seed 1 unless said), then the task stage as in docs/results/phase1-tasks.md.
    step_graph: pretrain with the captured step, whose speed the GPU sets, not the host (without it the same row
    pretrained 1,640-2,894 steps on different machines, and addition followed the steps: phase1-tasks-best-dense.md).
    task_graph: the compiled task stage's whole step captured as one CUDA graph (--task_step_graph). task_time: the
    runner's --task_time_s (it starts a task stage only with that many seconds left; 240 by default, which a row
    without local layers, ~55 s of task stage and <= 40 s of scoring, does not need: two such rows then fit a call);
    such a row also keeps task_eval seconds for its scoring (--task_eval_s; 30 by default: 6-10 s measured on an
    H200 for most of them, but the stripped row took 38 s and the hash_nodigit one 86 s, which pass their own) instead
    of the default 150 s, which the rows with local layers need (86-121 s on an H200), so the deadline does not cut
    its stage early. The flag only moves where a stage would be cut, so the rows that ran without it (forty-seventh
    session and before) are unchanged. tests/test_gpu_scripts.py checks these against the committed logs."""
    sweep = f" --from_sweep --sweep_dir docs/results/phase1-sweep/sweep --override {overrides}" if overrides else ""
    return dict(GPU0=arm, BUDGET="75", TASKS="1",
                EXTRA=f"--seed {seed} {'--step_graph ' if step_graph else ''}"
                      f"{'--task_compile ' if task_compile else ''}{'--task_step_graph ' if task_graph else ''}"
                      f"{f'--task_time_s {task_time} --task_eval_s {task_eval} ' if task_time else ''}"
                      f"--task_steps {task_steps} --task_lr 1e-3 --task_n 200{sweep}")


# env of scripts/gpu_phase1_parallel.sh per row (T and BUDGET come from the command line, 594 / 420 by default)
ROWS = {
    "bpe seed 1": dict(GPU0="bpe", OVERHEAD="140", EXTRA=f"--seed 1 {SWEPT} --override dropout=0.1"),
    "entropy patching, stage A compiled, no joint phase": dict(
        GPU0="ionllama", OVERHEAD="150",
        EXTRA="--step_graph --override n_layers=8,latent_shift=completed,dropout=0.1,joint_frac=0"),
    "3-byte patches seed 1": dict(
        GPU0="ionllama_fixed", EXTRA=f"--seed 1 {SWEPT} --override latent_shift=completed,dropout=0.1,fixed_patch_size=3"),
    "attention pooling": dict(GPU0="ionllama_fixed",
                              EXTRA=f"{SWEPT} --override latent_shift=completed,dropout=0.1,pooling=attention"),
    # the twenty-fourth session's plan: the dense row with weight decay 0.2, a wider dilated window, 8K windows
    "dense row, weight decay 0.2": dict(GPU0="ionllama_fixed", OVERHEAD="110", EXTRA=f"{SWEPT} --override {BEST},"
                                        "attention=dense,weight_decay=0.2"),
    "dense row, cosine to zero": dict(GPU0="ionllama_fixed", OVERHEAD="110", EXTRA=f"{SWEPT} --override {BEST},"
                                      "attention=dense,min_lr_ratio=0"),
    "dilated local_width 16": dict(GPU0="ionllama_fixed", OVERHEAD="110",
                                   EXTRA=f"{SWEPT} --override {BEST},local_width=16"),
    "2K windows, dense": dict(GPU0="ionllama_fixed", OVERHEAD="110",
                              EXTRA=f"{SWEPT} {WIN2K} --override {BEST},attention=dense"),
    "8K windows, dense": dict(GPU0="ionllama_fixed", OVERHEAD="110", EXTRA=f"{SWEPT} --seq_len 8192 --batch_size 8 "
                              f"--also_eval_seq_len 1024 --override {BEST},attention=dense"),
    # the twenty-fifth session's plan adds the dilated 8K row
    "8K windows, dilated": dict(GPU0="ionllama_fixed", OVERHEAD="110", EXTRA=f"{SWEPT} --seq_len 8192 --batch_size 8 "
                                f"--also_eval_seq_len 1024 --override {BEST}"),
    # the twenty-seventh session's plan: BPE at the dense row's 2K windows (Q1 at equal context), dilated lw16 there
    "2K windows, bpe": dict(GPU0="bpe", OVERHEAD="110", EXTRA=f"{SWEPT} {WIN2K} --override dropout=0.1"),
    "2K windows, dense, seed 1": dict(GPU0="ionllama_fixed", OVERHEAD="110",
                                      EXTRA=f"--seed 1 {SWEPT} {WIN2K} --override {BEST},attention=dense"),
    "2K windows, dilated local_width 16": dict(GPU0="ionllama_fixed", OVERHEAD="110",
                                               EXTRA=f"{SWEPT} {WIN2K} --override {BEST},local_width=16"),
    # the twenty-eighth session's plan: BPE's second seed in 2K windows
    "2K windows, bpe, seed 1": dict(GPU0="bpe", OVERHEAD="110",
                                    EXTRA=f"--seed 1 {SWEPT} {WIN2K} --override dropout=0.1"),
    # the thirtieth session: the dilated lw16 row's second seed (run from this row's command before it was listed)
    "2K windows, dilated local_width 16, seed 1": dict(
        GPU0="ionllama_fixed", OVERHEAD="110", EXTRA=f"--seed 1 {SWEPT} {WIN2K} --override {BEST},local_width=16"),
    # the thirtieth session's plan: Q2 at 4,096 bytes (~1,365 patches), against phase1-dense-seq4096's 1.3409
    "4K windows, dilated local_width 16": dict(
        GPU0="ionllama_fixed", OVERHEAD="110", EXTRA=f"{SWEPT} --seq_len 4096 --batch_size 16 --also_eval_seq_len 1024 "
        f"--override {BEST},local_width=16"),
    # the thirty-first session: its second seed (the first row's 1.3500 is 0.009 behind dense 4K's 1.3409)
    "4K windows, dilated local_width 16, seed 1": dict(
        GPU0="ionllama_fixed", OVERHEAD="110", EXTRA=f"--seed 1 {SWEPT} --seq_len 4096 --batch_size 16 "
        f"--also_eval_seq_len 1024 --override {BEST},local_width=16"),
    # the thirty-first session's plan: dense 4K's second seed (the lw16 seeds at 4K are 0.018 apart)
    "4K windows, dense, seed 1": dict(
        GPU0="ionllama_fixed", OVERHEAD="110", EXTRA=f"--seed 1 {SWEPT} --seq_len 4096 --batch_size 16 "
        f"--also_eval_seq_len 1024 --override {BEST},attention=dense"),
    "tasks 3-byte patches": _task_row("latent_shift=completed,fixed_patch_size=3"),
    "tasks ionllama_fixed": _task_row("latent_shift=completed"),
    # the thirty-second session: Q4 with the best 7-minute row (3-byte patches, attention pooling) under dense and
    # dilated latent attention, no dropout and no captured step like the other task rows: does the latent's reach
    # decide addition (0.165 with the thirteenth session's 4-byte dilated row)?
    "tasks best row, dense": _task_row("latent_shift=completed,fixed_patch_size=3,pooling=attention,attention=dense"),
    "tasks best row, dilated": _task_row("latent_shift=completed,fixed_patch_size=3,pooling=attention"),
    "tasks best row, dilated, seed 2": _task_row("latent_shift=completed,fixed_patch_size=3,pooling=attention", seed=2),
    "tasks best row, dense, seed 2": _task_row(
        "latent_shift=completed,fixed_patch_size=3,pooling=attention,attention=dense", seed=2),
    "tasks best row, dense, seed 3": _task_row(
        "latent_shift=completed,fixed_patch_size=3,pooling=attention,attention=dense", seed=3),
    "tasks best row, dilated, seed 3": _task_row("latent_shift=completed,fixed_patch_size=3,pooling=attention", seed=3),
    # the thirty-fourth session's plan: the same two rows pretrained with the captured step (GPU-bound: about the
    # same steps on any machine), so that attention, not the host, separates them
    "tasks best row, dense, captured step": _task_row(
        "latent_shift=completed,fixed_patch_size=3,pooling=attention,attention=dense", step_graph=True),
    "tasks best row, dilated, captured step": _task_row(
        "latent_shift=completed,fixed_patch_size=3,pooling=attention", step_graph=True),
    # the thirty-fifth session: at equal steps (3,219 / 3,241) seed 1 added 0.21 dense, 0.07 dilated; second seeds
    "tasks best row, dilated, captured step, seed 2": _task_row(
        "latent_shift=completed,fixed_patch_size=3,pooling=attention", step_graph=True, seed=2),
    "tasks best row, dense, captured step, seed 2": _task_row(
        "latent_shift=completed,fixed_patch_size=3,pooling=attention,attention=dense", step_graph=True, seed=2),
    # the thirty-fifth session's plan: a task stage twice as long, compiled (2.29x per step,
    # task-stage-compile-s35.md), so that every seed gets past the 2-digit jump; compare only among these rows
    **{f"tasks best row, {att}, long compiled stage, seed {seed}": _task_row(
        f"latent_shift=completed,fixed_patch_size=3,pooling=attention{',attention=dense' if att == 'dense' else ''}",
        step_graph=True, seed=seed, task_steps=6000, task_compile=True)
       for att in ("dense", "dilated") for seed in (1, 2)},
    # the thirty-sixth session's plan: Q4 itself at 6,000 steps. The dense-byte and BPE arms of phase1-tasks.md
    # (matrix defaults, no sweep) through the same long compiled stage, pretrained with the captured step
    **{f"tasks {arm} baseline, long compiled stage, seed {seed}": _task_row(
        "", step_graph=True, seed=seed, task_steps=6000, task_compile=True, arm=arm)
       for arm in ("dense", "bpe") for seed in (1, 2)},
    # the thirty-seventh session's plan: at 6,000 task steps every fixed-3 row fails 3-digit sums (0.095-0.145) that
    # the dense byte model learns (0.815-0.925). Fixed patches cut a number wherever its position falls; SpaceByte's
    # rule starts a patch after every non-word byte, so each operand is one patch, as a BPE token run is. The best
    # row with that one change: if it adds like the dense byte model, position-cut patches are the cause
    "tasks best row, space patching, long compiled stage, seed 1": _task_row(
        "latent_shift=completed,patching=space,pooling=attention", step_graph=True, task_steps=6000,
        task_compile=True),
    # the fortieth session: space patching did not help (add 0.226), and at 35M the latent (25M) is already larger
    # than the whole dense byte model that learns 3-4 digit sums (14M), so the latent's size is not it either. What
    # is left: a patch's bytes are all predicted from one latent vector (the previous completed patch), so a 3-byte
    # patch of answer digits is foreseen up to 3 bytes ahead, while the dense byte model predicts one byte at a time.
    # 1-byte patches make the latent a byte-level transformer (dense attention, as the dense byte model): if this row
    # adds like the dense byte model, predicting several bytes from one latent is the cause
    "tasks best row, 1-byte patches, dense, long compiled stage, seed 1": _task_row(
        "latent_shift=completed,fixed_patch_size=1,pooling=attention,attention=dense", step_graph=True,
        task_steps=6000, task_compile=True),
    # it did not (add 0.370; 3 digits 0.145, as the 3-byte rows): the bisection's other end. The same model stripped
    # to its latent transformer over bytes (no n-gram tables, no local layers): a plain byte transformer of 25M. If
    # it adds like the dense byte model, the byte path around the latent costs the sums; if not, the model's size
    # and hyper-parameters (the sweep's, against the dense arm's matrix defaults) do
    **{f"tasks best row, 1-byte patches, stripped, long compiled stage, seed {seed}": _task_row(
        "latent_shift=completed,fixed_patch_size=1,pooling=attention,attention=dense,n_enc_layers=0,n_dec_layers=0,"
        "ngram=none", step_graph=True, task_steps=6000, task_compile=True, seed=seed,
        task_time=None if seed == 1 else 120, task_eval=60) for seed in (1, 2)},  # scoring took 38 s (seed 1)
    # it did (add 0.960): the byte path costs the sums. Which part: the n-gram tables back, still no local layers
    **{f"tasks best row, 1-byte patches, no local layers, long compiled stage, seed {seed}": _task_row(
        "latent_shift=completed,fixed_patch_size=1,pooling=attention,attention=dense,n_enc_layers=0,n_dec_layers=0",
        step_graph=True, task_steps=6000, task_compile=True, seed=seed,
        task_time=None if seed == 1 else 120) for seed in (1, 2)},
    # add 0.064: the n-gram tables cost the sums. Collisions (4,096 buckets per n-gram size, ~10^5 digit 5-grams)
    # or the lookups themselves? The same row with 8x the buckets (--task_time_s 120: its first run, at --t 300 and
    # the default 240, pretrained only)
    "tasks best row, 1-byte patches, no local layers, 32K buckets, long compiled stage, seed 1": _task_row(
        "latent_shift=completed,fixed_patch_size=1,pooling=attention,attention=dense,n_enc_layers=0,n_dec_layers=0,"
        "ngram_buckets=32768", step_graph=True, task_steps=6000, task_compile=True, task_time=120),
    # and the tables with 2- and 3-grams only (no 4-/5-gram lookups, where pure digit strings crowd the buckets; the
    # 2-digit prompts' own n-grams hardly collide at any size: scripts/digit_ngram_buckets.py)
    # (forty-third session: add 0.80, val 1.4866, better than the 2-5-gram tables on both; seed 2 next, and the
    # full best row with 2-3-grams. A row needs ~400 s of a call: at --t 295 the task stage did not fit)
    **{f"tasks best row, 1-byte patches, no local layers, 2-3-grams, long compiled stage, seed {seed}": _task_row(
        "latent_shift=completed,fixed_patch_size=1,pooling=attention,attention=dense,n_enc_layers=0,n_dec_layers=0,"
        "ngram_sizes=2+3", step_graph=True, task_steps=6000, task_compile=True, seed=seed, task_time=120)
       for seed in (1, 2)},
    # (forty-seventh session: seed 1 val 1.5111 against 1.5577-1.5602 with 2-5-grams, add 0.406; seed 2 would
    # confirm the text gain before 2-3 becomes the default. ~410 s of a call)
    **{f"tasks best row, 2-3-grams, long compiled stage, seed {seed}": _task_row(
        "latent_shift=completed,fixed_patch_size=3,pooling=attention,attention=dense,ngram_sizes=2+3",
        step_graph=True, task_steps=6000, task_compile=True, seed=seed) for seed in (1, 2)},
    # the fortieth session's plan: does the real model (3-byte patches, local layers) add once the hashed tables are
    # gone, either with plain byte vectors or with the causal convolution as its n-gram context?
    **{f"tasks best row, n-gram {mode}, long compiled stage, seed 1": _task_row(
        f"latent_shift=completed,fixed_patch_size=3,pooling=attention,attention=dense,ngram={mode}", step_graph=True,
        task_steps=6000, task_compile=True) for mode in ("none", "conv")},
    # the same row as "tasks best row, n-gram none, ...", its task stage's step captured (--task_step_graph, built in
    # the fortieth session, not yet run on a GPU: time it with bench_task_stage.py --step_graph first)
    "tasks best row, n-gram none, long captured stage, seed 1": _task_row(
        "latent_shift=completed,fixed_patch_size=3,pooling=attention,attention=dense,ngram=none", step_graph=True,
        task_steps=6000, task_compile=True, task_graph=True),
    # the tables kept for text and off on digits (ngram=hash_nodigit, forty-first session): does the model keep the
    # tables' text BPB (1.5017 against 1.5384 without them) and add like the stripped row (0.956)? At 1-byte patches
    # without local layers (the clean contrast, two fit one call with --task_time_s 120) and in the full best row
    "tasks best row, 1-byte patches, no local layers, n-grams without digits, long compiled stage, seed 1": _task_row(
        "latent_shift=completed,fixed_patch_size=1,pooling=attention,attention=dense,n_enc_layers=0,n_dec_layers=0,"
        "ngram=hash_nodigit", step_graph=True, task_steps=6000, task_compile=True, task_time=120,
        task_eval=120),  # its scoring took 86 s on an H200 (phase1-tasks-long-nolocal1-nodigit-s1/log_gpu0.txt)
    "tasks best row, n-gram hash_nodigit, long compiled stage, seed 1": _task_row(
        "latent_shift=completed,fixed_patch_size=3,pooling=attention,attention=dense,ngram=hash_nodigit",
        step_graph=True, task_steps=6000, task_compile=True),
    # the forty-eighth session's audit: init_weights' GPT-2 rule scaled the IntegralLNN blocks' input projection
    # (in_proj) as a residual output and drew their conv at 0.02 (config local_init). The full best row with the
    # intended init, against its three 2-5-gram runs (val 1.5577-1.5602 on H200s; on an H100 compare at equal steps
    # with scripts/train_val_gap.py --steps). Q3 (IntegralLNN against transformer local layers) rests on this init
    "tasks best row, local_init inputs, long compiled stage, seed 1": _task_row(
        "latent_shift=completed,fixed_patch_size=3,pooling=attention,attention=dense,local_init=inputs",
        step_graph=True, task_steps=6000, task_compile=True),
    # the 2 x 2 at 1-byte patches: local layers without the tables (the tiny probe's decoder layers cost the jump)
    "tasks best row, 1-byte patches, no n-gram tables, long compiled stage, seed 1": _task_row(
        "latent_shift=completed,fixed_patch_size=1,pooling=attention,attention=dense,ngram=none", step_graph=True,
        task_steps=6000, task_compile=True),
}
# the copies of the data the session makes before its calls (docs/notes/gpu-runbook.md), renamed on the device
DATA_MOVES = "rm -rf .data/gutenberg .data/wikipedia && mv .data/gut .data/gutenberg && mv .data/wk .data/wikipedia"
RUN_LIMIT = 2000  # characters the device tool takes per command
PREP_AND_MARGIN_S = 45
CALL_LIMIT_S = 595  # one device call runs at most 600 s


def row_env(row: str, res: str, t: int = 594, budget: int | None = None) -> dict:
    """The env of scripts/gpu_phase1_parallel.sh that trains `row` into docs/results/<res> within t seconds."""
    if row not in ROWS:
        raise UserError(f"unknown row {row!r}; run scripts/phase1_rows.py without arguments for the list")
    # a bare, shell-safe name: the script splits its flags on spaces, and ".." would put results in docs/
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", res or "") or ".." in res:
        raise UserError(f"--res {res!r}: give a bare folder name under docs/results (letters, digits, . _ -), e.g. "
                        "phase1-bpe-seq2048")
    if budget is not None and "BUDGET" in ROWS[row]:  # (the row's own value won before, without a word)
        raise UserError(f"row {row!r} sets its own budget ({ROWS[row]['BUDGET']} s): leave out --budget, or add a row")
    env = {"T": str(t), "BUDGET": str(420 if budget is None else budget), "RES": f"docs/results/{res}", **ROWS[row]}
    # gpu_phase1_parallel.sh gives the arm T - (data preparation, up to ~30 s with BPE's tokenizer) - 15 s, and the
    # runner starts an arm only if budget + overhead fit that (the twenty-eighth session's T=560 call did not start)
    if env.get("TASKS") != "1" and int(env["BUDGET"]) + int(env.get("OVERHEAD", 90)) + PREP_AND_MARGIN_S > t:
        raise UserError(f"row {row!r}: budget {env['BUDGET']} s + overhead {env.get('OVERHEAD', 90)} s does not fit "
                        f"T={t} s; raise --t or lower --budget")
    return env


def _check_commit(commit: str) -> None:
    # the commit goes into a shell line unquoted by design (it is a hash): anything else could run commands there
    if not re.fullmatch(r"[0-9a-f]{4,40}", commit or ""):
        raise UserError(f"--commit {commit!r}: give a git commit hash (4-40 hex digits), e.g. $(git rev-parse HEAD)")


def _assigns(env: dict) -> str:
    return " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())


def _checked_length(cmd: str, what: str) -> str:
    if len(cmd) > RUN_LIMIT:
        raise UserError(f"{what}: the command is {len(cmd)} characters, over the device tool's {RUN_LIMIT}")
    return cmd


def device_command(row: str, res: str, commit: str, t: int = 594, budget: int | None = None) -> str:
    """The one-line command for the device tool (carry .data/gut and .data/wk) that trains `row` into
    docs/results/<res>. budget: the arm's training seconds (420 by default) for a row that does not set its own."""
    env = row_env(row, res, t, budget)
    _check_commit(commit)
    cmd = f"{DATA_MOVES} && export BENCH_COMMIT={commit} && {_assigns(env)} bash scripts/gpu_phase1_parallel.sh"
    return _checked_length(cmd, f"row {row!r}")


def chained_command(specs: list[tuple[str, str, int]], commit: str) -> str:
    """Several (row, res, t) one after the other in one device call, each with its own deadline and its own
    $OUT/rowN folder (the script writes phase1.tgz and its logs under $OUT: the second row would overwrite the
    first's). Why: short task rows (~185-225 s without local layers) fit two to a call, and each fresh machine
    costs about a minute of device time."""
    envs = [row_env(row, res, t) for row, res, t in specs]
    names = [res for _, res, _ in specs]
    if len(set(names)) < len(names):  # two rows in one folder: the second would find the first's results
        shared = ", ".join(sorted({n for n in names if names.count(n) > 1}))
        raise UserError(f"two chained rows share a --res ({shared}); give each row its own folder")
    _check_commit(commit)
    if sum(t for _, _, t in specs) > CALL_LIMIT_S:
        raise UserError(f"the rows' --t add up to {sum(t for _, _, t in specs)} s, over the {CALL_LIMIT_S} s one "
                        "call may run; give each row less time, or chain fewer rows")
    dirs = " ".join(f'"$OUT/row{i + 1}"' for i in range(len(specs)))
    runs = "; ".join(f'{_assigns(env)} OUT="$OUT/row{i + 1}" bash scripts/gpu_phase1_parallel.sh'
                     for i, env in enumerate(envs))
    cmd = f"{DATA_MOVES} && export BENCH_COMMIT={commit} && mkdir -p {dirs} && {{ {runs}; }}"
    return _checked_length(cmd, f"{len(specs)} chained rows")


def head_commit() -> str:
    return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).resolve().parents[1]).stdout.strip()


@cli_entry
def main(argv: list[str] | None = None) -> None:
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("rows", nargs="*", metavar="row",
                   help="a row name (quoted); several: one after the other in one call; none lists them")
    # (--res and --t repeat rather than take several values: `--res x "row"` read the row as a second name)
    p.add_argument("--res", action="append", help="results folder name under docs/results (once per row)")
    p.add_argument("--commit", help="BENCH_COMMIT (default: git HEAD)")
    p.add_argument("--t", type=int, action="append", help="seconds for the whole call (594; once per row)")
    p.add_argument("--budget", type=int, default=None,
                   help="training seconds of the arm (default 420; refused for rows that set their own)")
    a = p.parse_args(argv)
    a.t = a.t or [594]
    for t in a.t:
        if t < 1:
            raise UserError(f"--t must be at least 1 (got {t})")
    check_ranges(a, {"budget": 1})
    if not a.rows:
        print("\n".join(ROWS))
        return
    if not a.res:
        raise UserError("--res is needed: the results folder under docs/results, e.g. --res phase1-bpe-seq2048")
    commit = a.commit or head_commit()
    if len(a.rows) == 1:
        if len(a.res) != 1 or len(a.t) != 1:
            raise UserError("one row takes one --res and one --t")
        print(device_command(a.rows[0], a.res[0], commit, a.t[0], a.budget))
        return
    if len(a.res) != len(a.rows) or len(a.t) != len(a.rows):
        raise UserError(f"{len(a.rows)} rows need {len(a.rows)} --res names and {len(a.rows)} --t values, in the "
                        "rows' order (e.g. --res a --res b --t 250 --t 300)")
    if a.budget is not None:
        raise UserError("--budget is for one row; chained rows keep their own budgets")
    print(chained_command(list(zip(a.rows, a.res, a.t)), commit))


if __name__ == "__main__":
    main()
