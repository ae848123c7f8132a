"""The report: a Markdown table section, a JSON summary and the plots of a results folder."""
from __future__ import annotations

import json
import shlex
from pathlib import Path

from ._common import WHERE_FLAGS, _log, _read_json, _write_json, flag_values


def collect(runs: dict[str, Path]) -> dict:
    """name -> final.json (with tasks.json under "tasks") of each run folder that has finished."""
    arms = {}
    for n, d in runs.items():
        f = _read_json(d / "final.json")
        if f:
            t = _read_json(d / "tasks.json")
            if t:
                f["tasks"] = t
            arms[n] = f
    return arms


def _fmt(v, digits=3):
    if v is None:
        return "—"
    if isinstance(v, float):
        if abs(v) >= 1e6:
            return f"{v:.3g}"
        return f"{v:.{digits}f}"
    return str(v)


def _extra_cell(f: dict, name: str) -> str:
    """One extra eval set's BPB; a `val@N` of a token model says its window in tokens (--also_eval_seq_len is in
    bytes and is divided by token_seq_div for BPE, so its 'val@1024' is 256 tokens, not 1,024 bytes)."""
    r = f.get(name, {})
    cell = _fmt(r.get("bpb"), 4)
    if name.startswith("val@") and r.get("seq_len") and f["train"].get("seq_len_unit") == "tokens":
        cell += f" ({r['seq_len']} tokens)"
    return cell


def table_markdown(arms: dict, extra_sets: list[str]) -> str:
    slow = all(f["train"]["bytes_per_s"] < 1e5 for f in arms.values())  # CPU runs: KB/s, not 0.00 MB/s
    unit, div = ("KB/s", 1e3) if slow else ("MB/s", 1e6)
    head = ["arm", "params", "val BPB", *[f"{s} BPB" for s in extra_sets], "train s", "steps", unit,
            "bytes/patch", "epochs", "train FLOPs"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    # a non-finite final BPB is written as null: those rows last (comparing None with a float was a TypeError)
    def last_if_null(kv):
        bpb = kv[1]["val"].get("bpb")
        return bpb is None, bpb or 0.0

    for n, f in sorted(arms.items(), key=last_if_null):
        t = f["train"]
        row = [n, f"{f['params'] / 1e6:.1f}M", _fmt(f["val"]["bpb"], 4),
               *[_extra_cell(f, s) for s in extra_sets],
               # a row cut short by the wall-clock deadline shows its budget: it is not a full row
               f"{t['train_time_s']:.0f}" + (f" (cut, of {t['budget_s']:.0f})" if t.get("cut_short_s") else ""),
               str(t["steps"]), f"{t['bytes_per_s'] / div:.2f}",
               _fmt(f.get("bytes_per_patch"), 2), f"{t['epochs']:.2f}", _fmt(t.get("train_flops"))]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def tasks_markdown(arms: dict) -> str:
    from ..data import tasks as T

    have = {n: f["tasks"] for n, f in arms.items() if f.get("tasks")}
    if not have:
        return ""
    lines = ["| arm | " + " | ".join(T.TASKS) + " |", "|---|" + "---|" * len(T.TASKS)]
    for n, t in have.items():
        cells = []
        for task in T.TASKS:
            r = t["results"]["per_task"].get(task)
            if r is None or r.get("accuracy") is None:
                cells.append("—")
            else:
                lo, hi = r.get("ci95", (None, None))
                cells.append(f"{r['accuracy']:.3f} [{_fmt(lo)}, {_fmt(hi)}] (n={r['n']})")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _task_arms_asked(cmd: str | None) -> set[str]:
    """The arms an experiment command ran the task stage for (--stage ...tasks, --task_arms), else none."""
    from .matrix import TASK_ARMS

    argv = shlex.split(cmd or "")
    flags = flag_values(argv[argv.index("experiment") + 1:] if "experiment" in argv else argv)
    if "tasks" not in str(flags.get("stage", "")).split(","):
        return set()
    return set(flags["task_arms"].split(",")) if isinstance(flags.get("task_arms"), str) else set(TASK_ARMS)


def bpb_at(records: list[dict], key: str, x: float) -> float | None:
    """Val BPB at `key` (train_flops / train_time_s / step) = x, linear between the curve points around x
    (None when the run never got as far, or has no curve point before x)."""
    # not the untrained model's "init" score at step 0 (as the plots leave it out): a line from it to the first
    # curve point is no measurement (phase1.md put bpe at 2.591 BPB at step 308, between 3.68 at step 0 and 1.665
    # at step 570), and with it "no curve point before x" could never hold
    pts = sorted((r[key], r["val_bpb"]) for r in records
                 if isinstance(r.get("val_bpb"), (int, float)) and isinstance(r.get(key), (int, float))
                 and r.get("phase") not in ("entropy", "init"))
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    # one point (its final evaluation alone, e.g. --curve_points 1): its score at its own total (there was no pair)
    if len(pts) == 1 and pts[0][0] == x:
        return pts[0][1]
    return None


EQUAL_VIEWS = {  # summary key -> (metrics.jsonl field, final.json train field, what the column means)
    "equal_flops": ("train_flops", "train_flops", "training FLOPs"),
    "equal_steps": ("step", "steps", "optimizer steps"),
    # the same training text (bytes of it; a token arm's counted as the bytes its tokens cover): separates a
    # faster arm's lead from a better one's
    "equal_text": ("bytes_seen", "bytes_seen", "training text (bytes)"),
}


def equal_at(arms: dict, records_of, view: str) -> dict:
    """Every arm's val BPB at the total (FLOPs, steps or text) of the arm that used the least: the
    equal-compute, equal-steps and equal-text views, read off each arm's curve."""
    key, train_key, _ = EQUAL_VIEWS[view]
    totals = {n: f["train"].get(train_key) for n, f in arms.items() if f["train"].get(train_key)}
    if len(totals) < 2:
        return {}
    x_star = min(totals.values())
    return {key: x_star, "arm": min(totals, key=totals.get),
            "val_bpb": {n: bpb_at(records_of(n), key, x_star) for n in totals}}


def equal_at_markdown(eq: dict, view: str) -> str:
    if not eq:
        return ""
    key, _, what = EQUAL_VIEWS[view]
    rows = sorted(eq["val_bpb"].items(), key=lambda kv: (kv[1] is None, kv[1] or 0.0))
    return "\n".join([f"Val BPB at equal {what} ({eq[key]:.3g}, the whole run of `{eq['arm']}`), "
                      "interpolated linearly between each arm's curve points (each scores the first "
                      "`--curve_eval_bytes` val bytes, except an arm's last point, its final evaluation over "
                      f"`--eval_bytes`: `{eq['arm']}`'s value here, and that of an arm ending at the same point):",
                      "", f"| arm | val BPB at equal {what} |", "|---|---|",
                      *[f"| {n} | {_fmt(v, 3)} |" for n, v in rows]])


def seed_groups(arms: dict, sets: list[str]) -> list[dict]:
    """Runs that differ only in --seed (same spec, same training flags apart from where they ran): each metric's
    mean and spread (max - min) over them, so a gap between settings can be read against the seed noise."""
    groups: dict[str, list[tuple[str, str]]] = {}
    for n, f in arms.items():
        if (f.get("train") or {}).get("cut_short_s") is not None:
            continue  # a part of its budget (--deadline_s): its BPB is no sample of the full run's seed noise
        flags = flag_values(shlex.split(f.get("trainer_command", ""))[2:])
        seed = flags.pop("seed", None)
        if seed is None:
            continue
        for k in WHERE_FLAGS | {"run_name"}:
            flags.pop(k, None)
        groups.setdefault(json.dumps([f.get("spec"), flags], sort_keys=True), []).append((n, seed))
    out = []
    for members in groups.values():
        if len(members) < 2 or len({seed for _, seed in members}) < len(members):
            continue
        g = {"runs": [n for n, _ in members], "seeds": [seed for _, seed in members]}
        for k in sets:
            vals = [arms[n].get(k, {}).get("bpb") for n, _ in members]
            if all(isinstance(v, (int, float)) for v in vals):
                g[k] = {"mean": sum(vals) / len(vals), "spread": max(vals) - min(vals)}
        out.append(g)
    return out


def seed_groups_markdown(groups: list[dict], sets: list[str]) -> str:
    if not groups:
        return ""
    cols = [k for k in sets if any(k in g for g in groups)]
    lines = ["Runs that differ only in their seed: mean (spread, max - min) of each BPB:", "",
             "| runs | seeds | " + " | ".join(f"{k} BPB" for k in cols) + " |", "|---|---|" + "---|" * len(cols)]
    for g in groups:
        cells = [f"{g[k]['mean']:.4f} ({g[k]['spread']:.4f})" if k in g else "-" for k in cols]
        lines.append(f"| {', '.join(g['runs'])} | {', '.join(g['seeds'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curves(arms: dict, out: Path, records_of) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    for x_key, fname, xlabel in (("train_time_s", "bpb_vs_time.png", "training time (s, evaluation excluded)"),
                                 ("train_flops", "bpb_vs_flops.png", "training FLOPs (estimate)")):
        fig, ax = plt.subplots(figsize=(7.5, 4.8))
        n = 0
        for name in arms:
            pts = [(r[x_key], r["val_bpb"]) for r in records_of(name)
                   if isinstance(r.get("val_bpb"), (int, float)) and r.get("phase") not in ("init", "entropy")
                   and isinstance(r.get(x_key), (int, float)) and r[x_key] > 0]
            if pts:
                xs, ys = zip(*sorted(pts))
                ax.plot(xs, ys, marker="o", ms=3, lw=1.5, label=name)
                n += 1
        if not n:
            plt.close(fig)
            continue
        ax.set_xlabel(xlabel)
        ax.set_ylabel("val bits per byte")
        if x_key == "train_flops":
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title("Phase 1: val BPB, one line per arm")
        fig.tight_layout()
        fig.savefig(out / fname, dpi=120)
        plt.close(fig)
        made.append(out / fname)
    return made


BEGIN, END = "<!-- experiment-table:begin -->", "<!-- experiment-table:end -->"


def scoring_note(arms: dict) -> str | None:
    """A warning line when the rows' val BPB were not scored alike (other val bytes, window or val data), else None.
    A comparison across results folders put 500,000 bytes in 256-byte windows beside 2,000,000 in 4,096-byte ones,
    under one "val BPB" heading, without a word (a new user's audit)."""
    def unit_of(f):
        return "tokens" if (f.get("model") or f.get("spec", {}).get("model")) == "bpe" else "bytes"

    def window(f):
        t = f.get("train") or {}
        return f"{t.get('seq_len')} {unit_of(f)}" if t.get("seq_len") else "?"

    def scored(f):
        return (f.get("val") or {}).get("bytes")

    # windows are compared within one unit: a token model's window in tokens is matched to the byte models' by
    # design (the Phase-1 matrix: 1,024 bytes against 256 tokens of ~4 bytes)
    facts = {"val bytes scored": {n: scored(f) for n, f in arms.items()},
             **{f"window ({label})": {n: window(f) for n, f in arms.items()
                                      if unit_of(f) == u and (f.get("train") or {}).get("seq_len")}
                for u, label in (("bytes", "byte models"), ("tokens", "token models"))},
             "val data (sha256)": {n: ((f.get("data") or {}).get("val_sha256") or "?")[:12] for n, f in arms.items()}}
    differ = []
    for what, by_arm in facts.items():
        groups: dict = {}
        for n, v in by_arm.items():
            groups.setdefault(v, []).append(n)
        if len(groups) > 1:
            differ.append(f"{what}: " + "; ".join(f"{v:,} ({', '.join(ns)})" if isinstance(v, int) else
                                                  f"{v} ({', '.join(ns)})" for v, ns in groups.items()))
    if not differ:
        return None
    return ("**Not scored alike**, so these val BPB are not directly comparable: " + " | ".join(differ) + ".")


# experiment flags that say where or how a run was kept, not what it measured
_BOOKKEEPING_FLAGS = {"arms", "stage", "runs", "out", "title", "ckpt_dir", "deadline_s", "checkpoint_every_s",
                      "arm_overhead_s", "log_interval", "task_arms", "data_dir", "eval_batch_size", "device"}


def run_settings(f: dict) -> dict[str, object]:
    """The experiment flags a row was measured under: its pretraining command's flags, and the task flags of the
    command that ran its task stage (a later invocation may have run it), less the bookkeeping flags."""
    def flags(cmd: str | None) -> dict:
        argv = shlex.split(cmd or "")
        return flag_values(argv[argv.index("experiment") + 1:] if "experiment" in argv else argv)

    out = {k: v for k, v in flags(f.get("command")).items()
           if k not in _BOOKKEEPING_FLAGS and not k.startswith("task_")}
    if f.get("tasks"):
        out.update({k: v for k, v in flags(f["tasks"].get("command")).items()
                    if k.startswith("task_") and k not in _BOOKKEEPING_FLAGS})
    return out


def settings_note(arms: dict) -> str | None:
    """A line naming the experiment flags whose values differ between the rows of one page, else None. Why: runs of
    different invocations land in one --out (say `--arms dense --seed 1`, later `--arms bpe --seed 2 --task_steps
    6000`) and the table set them side by side as if run alike; the header names only the report's command."""
    per_arm = {n: run_settings(f) for n, f in arms.items() if f.get("command")}
    if len(per_arm) < 2:
        return None
    differ = []
    for k in sorted({k for s in per_arm.values() for k in s}):
        groups: dict[str, list[str]] = {}
        for n, s in per_arm.items():
            v = s.get(k)
            groups.setdefault("(default)" if v is None else "(on)" if v is True else str(v), []).append(n)
        if len(groups) > 1:
            differ.append(f"--{k}: " + "; ".join(f"{v} ({', '.join(ns)})" for v, ns in groups.items()))
    if not differ:
        return None
    return "**Run with different settings**: " + " | ".join(differ) + "."


def write_report(out: Path, runs: list[str] | dict[str, Path], command: str, label: str = "phase1",
                 title: str | None = None, expected: list[str] | None = None) -> dict:
    """The table section of <out>.md, <out>.json and the plots in <out>/ for the runs <out>/<name> (a list of
    names), or for run folders anywhere (a dict name -> folder: a comparison across results folders). `title`
    heads a new page, or replaces the placeholder heading ("# <label>") of one written before; a heading written
    by hand is kept. `expected`: the runs this command asked for (--arms), the only ones "Not yet run" names (a
    one-arm row listed the other eight arms of the matrix)."""
    from ..train.metrics import metrics_file, read_metrics

    runs = dict(runs) if isinstance(runs, dict) else {n: out / n for n in runs}
    names = list(runs)
    arms = collect(runs)
    extra = sorted({k for f in arms.values() for k in f if isinstance(f.get(k), dict) and "bpb" in f[k]} - {"val"})
    summary = {"matrix": label, "arms": {n: {k: f.get(k) for k in ("params", "val", "train", "bytes_per_patch",
                                                                   "device", "date", "git", "command", "spec", *extra)}
                                         for n, f in arms.items()},
               "tasks": {n: f["tasks"]["results"]["per_task"] for n, f in arms.items() if f.get("tasks")},
               # the task stage is an invocation of its own (often later, another commit): its own provenance
               "tasks_provenance": {n: {k: f["tasks"].get(k) for k in ("command", "device", "date", "git")}
                                    for n, f in arms.items() if f.get("tasks")},
               "missing": [n for n in (expected or names) if n not in arms]}
    # rows a command of their results folder ran the task stage for, without a tasks.json (the stage was cut): the
    # task table left them out without a word, while "Not yet run" names only rows without final.json
    # (phase1-tasks-long-ng23-s2: its stage was cut, the page showed no task table and no note)
    asked: dict[Path, set[str]] = {}
    for n, f in arms.items():
        for cmd in (f.get("command"), (f.get("tasks") or {}).get("command")):
            asked.setdefault(runs[n].parent, set()).update(_task_arms_asked(cmd))
    untasked = [n for n, f in arms.items() if not f.get("tasks") and runs[n].name in asked[runs[n].parent]]
    if untasked:
        summary["tasks_missing"] = untasked

    records = {n: read_metrics(runs[n]) if metrics_file(runs[n]) else []
               for n in arms}  # read once: the equal-FLOPs/-steps/-text views and the plots use them
    records_of = records.__getitem__

    views = {v: equal_at(arms, records_of, v) for v in EQUAL_VIEWS}
    summary.update({v: eq for v, eq in views.items() if eq})
    seeds = seed_groups(arms, ["val", *extra])
    if seeds:
        summary["seed_groups"] = seeds
    _write_json(out.parent / f"{out.name}.json", summary)
    if not arms:
        return summary
    out.mkdir(parents=True, exist_ok=True)
    plots = plot_curves(arms, out, records_of)
    devices = sorted({f["device"].get("name", "?") for f in arms.values()})
    dates = sorted({f["date"][:10] for f in arms.values()})
    commits = sorted({f["git"].get("sha", "?")[:10] for f in arms.values()})
    source = f"{out}/*/final.json" if all(d == out / n for n, d in runs.items()) else \
        ", ".join(f"{d}/final.json" for d in runs.values())
    # the commands that trained the rows, where not this one: a `--stage report` or `--stage tasks` invocation, or one
    # refused (`--budget_s 99 --seed 5` against rows of 2 s and seed 0) rebuilds the page, and its header named only
    # that command
    trained_by = sorted({f["command"] for f in arms.values() if f.get("command")} - {command})
    by = f"the rows trained by {', '.join(f'`{c}`' for c in trained_by)}; " if trained_by else ""
    body = [BEGIN, "", f"Generated by `{command}` from {source} "
            f"({by}device: {', '.join(devices)}; dates: {', '.join(dates)}; commits: {', '.join(commits)}).", "",
            table_markdown(arms, extra), ""]
    for v, eq in views.items():
        if eq:
            body += [equal_at_markdown(eq, v), ""]
    if seeds:
        body += [seed_groups_markdown(seeds, ["val", *extra]), ""]
    for note in (scoring_note(arms), settings_note(arms)):
        if note:
            body += [note, ""]
            _log(note)
    t = tasks_markdown(arms)
    if t:
        staged = [f["tasks"] for f in arms.values() if f.get("tasks")]
        where = (f"device: {', '.join(sorted({(x.get('device') or {}).get('name', '?') for x in staged}))}; "
                 f"dates: {', '.join(sorted({(x.get('date') or '?')[:10] for x in staged}))}; "
                 f"commits: {', '.join(sorted({(x.get('git') or {}).get('sha', '?')[:10] for x in staged}))}")
        # the interval is binomial over one run's test prompts: a rerun of one row moved addition by 0.13 against a
        # +-0.035 interval, so the page must not read "intervals apart" as a difference between settings
        body += ["Task accuracy after identical task fine-tuning (held-out test split, exact match, 95% Wilson CI "
                 "over the n test prompts of one run (not over seeds or reruns, which move a row by more); "
                 f"the task stage's own runs, each arm's tasks.json: {where}):", "", t, ""]
    if summary.get("tasks_missing"):
        body += [f"No task scores: {', '.join(summary['tasks_missing'])} (no tasks.json: the task stage was "
                 "not run for it or did not finish).", ""]
    body += [f"![{'val BPB vs training FLOPs' if 'flops' in p.name else 'val BPB vs training time'}]({out.name}/{p.name})"
             for p in plots]
    if summary["missing"]:
        body += ["", f"Not yet run: {', '.join(summary['missing'])}."]
    body += ["", END]
    md = out.parent / f"{out.name}.md"
    text = md.read_text() if md.exists() else f"# {label}\n\n{BEGIN}\n{END}\n"
    if title and text.startswith(f"# {label}\n"):
        text = f"# {title}\n" + text[len(f"# {label}\n"):]
    elif title and not text.startswith(f"# {title}\n"):  # a heading of the user's is kept: said, not silent
        _log(f"note: {md} keeps its own heading; --title {title!r} is not applied (edit the heading by hand)")
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + "\n".join(body) + text[text.index(END) + len(END):]
    else:
        text = text.rstrip() + "\n\n" + "\n".join(body) + "\n"
    md.write_text(text)
    (out / "table.md").write_text(body[2] + "\n\n" + table_markdown(arms, extra) + "\n"
                                  + (("\n" + t + "\n") if t else ""))  # body[2]: command, device, dates
    _log(f"report: {md} (table section), {out.parent / (out.name + '.json')}, plots {[p.name for p in plots]}")
    return summary
