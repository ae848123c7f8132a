"""Which part of the design costs ionLlama arithmetic? (issue #11, question 4)

The Phase-1 task stage found ionLlama far behind the dense byte transformer and BPE at addition (0.165 against
0.63-0.68, `docs/results/phase1-tasks.md`) while level or ahead on the character tasks. This probe trains small
models *from scratch* on task examples only (no pretraining, so no arm starts ahead), every arm on the same
examples in the same order for the same steps, then scores greedy exact match on held-out operands per digit
count. The arms differ in one knob at a time, so the gaps point at a component: the patch size, dilated vs dense
latent attention, the local layers, the latent shift. The `bpe` arm is the tokenized baseline of question 4: the
dense arm's transformer over a byte-level BPE trained on the seed's own training examples.

    PYTHONPATH=. python benchmarks/probe_tasks.py --out docs/results/probe-add \\
        --arms dense ion_fixed3 ion_fixed3:attention=dense ion_fixed3:local_layers=transformer ion_byte

On 2 CPU cores, 3,000 steps with --row_len 64 took 390-1,088 s per arm (docs/results/probe-add.md). A rerun with
the same --out keeps the arms already finished with the same configuration.

An arm is NAME[:key=value,...]: NAME one of ARMS below, then model overrides (as `ionllama experiment --override`).
Writes OUT/probe.json (per arm: config, losses, seconds, results as `run_tasks` returns them) and OUT/probe.md.
`--combine DIR ...` puts several folders side by side (per-seed accuracies and their mean; folders of one seed
merge their arms).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ionllama import create_model
from ionllama.data import tasks as T
from ionllama.errors import OneLineParser, UserError, check_ranges, check_seed, cli_entry
from ionllama.eval.benchmark import device_name, git_commit
from ionllama.eval.task_eval import run_tasks
from ionllama.experiment.matrix import parse_overrides
from ionllama.experiment.tasks import check_task_row_len, task_batch, train_on_tasks
from ionllama.train.trainer import resolve_device

# Small models of about the same size (2.7M and 2.6M parameters; ionLlama's 1M of them in its n-gram embedding
# tables): the dense transformer and ionLlama with the Phase-1 pick's choices (fixed 3-byte patches, the
# "completed" shift) at tiny width.
_ION = dict(model="ionllama", d_model=128, n_layers=4, n_heads=4, d_local=128, n_enc_layers=1, n_dec_layers=2,
            latent_shift="completed")
ARMS = {
    "dense": dict(model="dense", d_model=192, n_layers=6, n_heads=6),
    "ion_fixed3": dict(_ION, patching="fixed", fixed_patch_size=3),
    "ion_byte": dict(_ION, patching="byte"),
    "ion_space": dict(_ION, patching="space"),
    # the tokenized baseline at the dense arm's size; its tokenizer is trained on this seed's training examples
    # (vocab_size = the tokenizer's target size, override with bpe:vocab_size=N)
    "bpe": dict(model="bpe", d_model=192, n_layers=6, n_heads=6, vocab_size=1024),
}


def parse_arm(text: str) -> tuple[str, dict]:
    name, _, over = text.partition(":")
    if name not in ARMS:
        raise UserError(f"unknown arm '{name}'; choose from {', '.join(ARMS)} (then :key=value,... overrides)")
    return text, {**ARMS[name], **parse_overrides([over] if over else [])}


def step_examples(seed: int, step: int, n: int, tasks: tuple[str, ...], max_digits: int) -> list:
    """Step `step`'s examples: a pure function of (seed, step), so every arm sees the same ones."""
    rng = np.random.default_rng([seed, step, 0x9A0B])
    return [T.sample_example(rng, tasks[int(rng.integers(len(tasks)))], "train", max_digits=max_digits)
            for _ in range(n)]


def probe_tokenizer(a, vocab_size: int):
    """A byte-level BPE trained on exactly the examples this seed trains on, prompts and answers as separate
    documents (the way `task_batch` encodes them): the tokenizer a BPE model of this task would have, with merges
    such as whole 2- and 3-digit numbers when the vocabulary leaves room for them."""
    from ionllama.data.bpe import train_tokenizer

    docs = [d for step in range(a.steps) for e in step_examples(a.seed, step, a.batch, a.tasks, a.max_digits)
            for d in (e.prompt, e.answer + b"\n")]
    return train_tokenizer(docs, vocab_size)


def tokenizer_record(bpe, a) -> dict:
    """How the tokenizer cuts held-out prompts: the pieces of a few, and tokens per prompt byte over all."""
    ex = [e for t in a.tasks for e in T.make_task_examples(t, "test", 8, seed=1234, max_digits=a.max_digits)]
    ids = bpe.encode_docs([e.prompt for e in ex])
    n_bytes = sum(len(e.prompt) for e in ex)
    return {"vocab_size": bpe.vocab_size, "tokens_per_byte": round(sum(len(i) for i in ids) / n_bytes, 4),
            "examples": [" | ".join(bpe.token_bytes[t].decode("utf-8", "replace") for t in i) for i in ids[:6]]}


def train_arm(cfg: dict, a, device) -> dict:
    torch.manual_seed(a.seed)
    extra = {}
    if cfg["model"] == "bpe":
        bpe = probe_tokenizer(a, cfg["vocab_size"])  # (draws no torch random numbers)
        model = create_model("tiny", **{**cfg, "vocab_size": bpe.vocab_size}).to(device)
        model.set_tokenizer(bpe)
        extra["tokenizer"] = tokenizer_record(bpe, a)
        print(f"  tokenizer: {extra['tokenizer']}", flush=True)
    else:
        model = create_model("tiny", **cfg).to(device)
    losses, train_s = train_on_tasks(
        model, device, None, a.steps, a.lr,
        lambda step: task_batch(model, step_examples(a.seed, step, a.batch, a.tasks, a.max_digits), a.row_len),
        log_every=100, on_log=lambda r: print(f"  step {r['step']} loss {r['loss']:.4f}", flush=True))
    results = run_tasks(model, device, n=a.n_test, max_digits=a.max_digits, seed=1234, trained_on_tasks=True,
                        split="test", batch_size=32, tasks=a.tasks)
    return {"config": cfg, "params": sum(p.numel() for p in model.parameters()), "train_s": round(train_s, 1),
            # loss in nats per answer *byte* for every arm (a BPE model's own loss is per token)
            "losses": [{"step": r["step"], "loss": round(r["bpb"] * math.log(2), 4)} for r in losses],
            "results": results, **extra}


def markdown(rows: dict, a) -> str:
    digits = range(1, a.max_digits + 1)
    lines = ["| arm | params | train s | final loss | " + " | ".join(
        f"{t} {d}d" if t in T.ARITH_TASKS else t for t in a.tasks for d in (digits if t in T.ARITH_TASKS else [0]))
        + " |"]
    lines.append("|" + "---|" * (lines[0].count("|") - 1))
    for name, r in rows.items():
        cells = []
        for t in a.tasks:
            rec = r["results"]["per_task"][t]
            recs = [rec["by_digits"][str(d)] for d in digits] if t in T.ARITH_TASKS else [rec]
            cells += [f"{x['accuracy']:.3f} [{x['ci95'][0]:.2f}, {x['ci95'][1]:.2f}]" for x in recs]
        lines.append(f"| {name} | {r['params']:,} | {r['train_s']} | {r['losses'][-1]['loss']} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def runs_markdown(rows: dict) -> str:
    """Which process trained each arm, for the arms that record it (written since the twentieth session)."""
    lines = [f"- {name}: {r['run']['device']}, torch {r['run']['torch']}, {r['run']['date']}, commit "
             f"{r['run']['commit']['sha'][:7]}{' (dirty tree)' if r['run']['commit'].get('dirty') else ''}"
             for name, r in rows.items() if "run" in r]
    return "\nTrained by:\n\n" + "\n".join(lines) + "\n" if lines else ""


# settings that must agree between folders for their accuracies to sit in one table (the seed may differ)
_SAME_SETTINGS = ("tasks", "max_digits", "steps", "batch", "row_len", "lr", "n_test")


def _differing(settings: dict, other: dict, keys: tuple[str, ...] = _SAME_SETTINGS) -> list[str]:
    """The keys in which two probe runs' settings differ (tuples compare as the lists JSON gives back)."""
    norm = lambda d, k: list(d[k]) if isinstance(d.get(k), tuple) else d.get(k)  # noqa: E731
    return [k for k in keys if norm(settings, k) != norm(other, k)]


def _resumable(path: Path, a: argparse.Namespace) -> dict:
    """The arms already in --out, if they were trained under this invocation's settings and seed: a folder of
    2-digit arms must not take 3-digit ones into one table (and one seed's folder not another seed's)."""
    if not path.exists():
        return {}
    old = json.loads(path.read_text())
    diff = _differing(old["meta"]["settings"], vars(a), (*_SAME_SETTINGS, "seed"))
    if diff:
        raise UserError(f"--out {path.parent} holds arms trained with other {', '.join(diff)}; "
                        "give a new --out folder (or the same settings to add arms)")
    return old["arms"]


def combine(dirs: list[str], out: Path, command: str) -> dict:
    """Several probe folders -> per arm and cell the accuracy of every seed and their mean. Folders of one seed
    merge (e.g. arms added later in their own folder); the same arm twice for one seed is refused, and so are
    folders whose training or test settings differ. The intervals of a single run are evaluation noise only;
    how far one arm moves between seeds is what tells whether a gap between arms is real."""
    runs = []
    for d in dirs:
        p = Path(d) / "probe.json"
        if not p.exists():
            raise UserError(f"--combine: {p} not found; give folders written by this script's --out")
        runs.append(json.loads(p.read_text()))
    first = runs[0]["meta"]["settings"]
    for d, r in zip(dirs, runs):
        diff = _differing(r["meta"]["settings"], first)
        if diff:
            raise UserError(f"--combine: {d} differs from {dirs[0]} in {', '.join(diff)}; combine like runs only")
    by_seed: dict[int, dict] = {}  # seed -> {arm: record}
    for d, r in zip(dirs, runs):
        arms = by_seed.setdefault(r["meta"]["settings"]["seed"], {})
        twice = sorted(set(arms) & set(r["arms"]))
        if twice:
            raise UserError(f"--combine: arm {twice[0]} of seed {r['meta']['settings']['seed']} is in two folders "
                            f"(the second: {d}); give each seed's arm once")
        arms.update(r["arms"])
    seeds = sorted(by_seed)
    tasks = first["tasks"]
    digits = range(1, first["max_digits"] + 1)
    cols = [(t, d) for t in tasks for d in (digits if t in T.ARITH_TASKS else [0])]
    table = {}
    for name in dict.fromkeys(n for r in runs for n in r["arms"]):  # first-seen order
        per_seed, loss = {}, {}
        for seed in seeds:
            if name in by_seed[seed]:
                per = by_seed[seed][name]["results"]["per_task"]
                per_seed[seed] = [(per[t]["by_digits"][str(d)] if d else per[t])["accuracy"] for t, d in cols]
                loss[seed] = by_seed[seed][name]["losses"][-1]["loss"]
        # the last logged batch's loss on the answers: one batch, but it moves less between seeds than the
        # accuracies, which jump when an arm learns the task
        table[name] = {"seeds": per_seed, "mean": [float(np.mean([v[i] for v in per_seed.values()]))
                                                    for i in range(len(cols))],
                       "last_loss": loss, "last_loss_mean": float(np.mean(list(loss.values())))}
    head = ["arm", "seeds"] + [f"{t} {d}d" if d else t for t, d in cols] + ["last-batch loss"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in table.items():
        cells = [f"**{m:.3f}** ({', '.join(f'{v[i]:.2f}' for v in row['seeds'].values())})"
                 for i, m in enumerate(row["mean"])]
        cells.append(f"**{row['last_loss_mean']:.3f}** ({', '.join(f'{v:.2f}' for v in row['last_loss'].values())})")
        lines.append(f"| {name} | {', '.join(map(str, row['seeds']))} | " + " | ".join(cells) + " |")
    src = "\n".join(f"- seed {m['settings']['seed']}: `{d}` ({m['device']}, torch {m['torch']}, {m['date']}, "
                    f"commit {m['commit']['sha'][:7]})" for d, m in zip(dirs, (r["meta"] for r in runs)))
    out.mkdir(parents=True, exist_ok=True)
    (out / "combined.json").write_text(json.dumps({"dirs": dirs, "seeds": seeds, "columns": cols, "arms": table},
                                                  indent=1))
    (out / "combined.md").write_text(f"`{command}`\n\nMean over seeds (each seed's value in brackets, in seed "
                                     f"order): held-out accuracy, and the training loss (nats per answer byte) of "
                                     f"the last logged batch:\n\n{src}\n\n" + "\n".join(lines) + "\n")
    return table


def build_parser() -> argparse.ArgumentParser:
    ap = OneLineParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arms", nargs="+", default=["dense", "ion_fixed3"])
    ap.add_argument("--tasks", default="add", help="comma-separated, from " + ", ".join(T.TASKS))
    ap.add_argument("--max_digits", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=32, help="examples per step")
    ap.add_argument("--row_len", type=int, default=128, help="bytes per packed row")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--n_test", type=int, default=200, help="held-out prompts per task and digit count")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", required=True)
    ap.add_argument("--combine", nargs="+", metavar="DIR", default=None,
                    help="no training: combine the probe.json of these folders (one seed each) into "
                         "OUT/combined.md and OUT/combined.json")
    return ap


def _command(argv) -> str:
    return "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])


@cli_entry
def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    if a.combine:
        combine(a.combine, Path(a.out), _command(argv))
        print((Path(a.out) / "combined.md").read_text(), end="")
        return 0
    # before the first arm trains: --steps 0 ended in an IndexError after it, --batch 0 trained on nothing (nan loss)
    check_ranges(a, {"steps": 1, "batch": 1, "max_digits": 1, "n_test": 1, "threads": 0}, ("lr",))
    check_seed(a.seed)  # numpy's default_rng refused a negative seed with a traceback
    a.tasks = tuple(t for t in a.tasks.split(",") if t)
    if not a.tasks:
        raise UserError(f"--tasks names no task; choose from {', '.join(T.TASKS)}")
    for t in a.tasks:
        if t not in T.TASKS:
            raise UserError(f"--tasks: unknown task '{t}'; choose from {', '.join(T.TASKS)}")
    if a.threads:
        torch.set_num_threads(a.threads)
    arms = dict(parse_arm(s) for s in a.arms)
    # every step's examples are known now: a --row_len too short for one of them was refused only at that step,
    # mid-arm, perhaps hours in
    longest = max(len(e.prompt) + len(e.answer) + 1 for step in range(a.steps)
                  for e in step_examples(a.seed, step, a.batch, a.tasks, a.max_digits))
    check_task_row_len(a.row_len, longest, [n for n, c in arms.items() if c["model"] == "bpe"], flag="--row_len")
    device = resolve_device(a.device)  # the trainer's check: a bad name or --device cuda without a GPU is one line
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "probe.json"
    done = _resumable(path, a)  # resume: finished arms of the same settings are kept
    # what trained this invocation's arms, taken now: the code in memory is the tree at start, whatever is
    # committed while the arms run (a rerun keeps earlier arms with their own record)
    run = {"command": _command(argv),
           "device": device_name(device),
           "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "commit": git_commit()}
    meta = {**run, "settings": {k: v for k, v in vars(a).items() if k not in ("arms", "out")}}
    for name, cfg in arms.items():
        if name in done and done[name]["config"] == cfg:
            print(f"[probe] {name}: kept from {path}", flush=True)
            continue
        print(f"[probe] {name}: {cfg}", flush=True)
        done[name] = {**train_arm(cfg, a, device), "run": run}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"meta": meta, "arms": done}, indent=1))
        tmp.replace(path)
        (out / "probe.md").write_text(f"`{meta['command']}`\n\ndevice: {meta['device']}, torch {meta['torch']}, "
                                      f"{meta['date']}, commit {meta['commit']['sha']}\n\n" + markdown(done, a)
                                      + runs_markdown(done))
        print(markdown({name: done[name]}, a), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
