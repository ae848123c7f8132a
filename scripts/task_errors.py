"""Where the task answers go wrong (issue #11, Q4): reads the task_outputs.jsonl.gz that the task stage writes beside
tasks.json (every scored example) and tables, per arithmetic task and digit count, how the wrong answers are wrong.

    python scripts/task_errors.py docs/results/<row>/ionllama_fixed [more run folders or .jsonl.gz files]
    python scripts/task_errors.py A B --out docs/results/<name>-errors.md

Why: tasks.json keeps a few samples per cell, so "the patched model fails 3-4 digit sums" could not be looked into:
is it the length of the answer, the carries, or the place of a digit in its patch? Per wrong answer it takes the
first byte where the output leaves the answer (later bytes follow a wrong prefix, so only the first one is the
model's own error) and reports:
- the answer's length wrong (a digit dropped or added) against a same-length answer with wrong digits;
- for a same-length answer: the first wrong digit's place (units = 1, counted from the right) and, for addition,
  whether a carry came into that place, and whether the error is exactly a carry lost (one less) or one too many
  (one more);
- with fixed patches, the first wrong byte's place within its patch (patch starts are the multiples of the patch
  size in the bytes given to generate()), beside the places of all answer bytes of that cell. Read it with care:
  both operands of a cell have the same digit count, so every prompt of a cell has the same length, and a byte's
  place in its patch follows from its place in the answer. Within a cell the table cannot tell a patch effect from
  a digit-place effect; only a cell against another (other prompt lengths) or a run scored with shifted prompts can.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ionllama.errors import OneLineParser, UserError, check_ranges, cli_entry  # noqa: E402
from ionllama.eval.task_eval import OUTPUTS_FILE, read_outputs  # noqa: E402
from ionllama.fsutil import atomic_write, out_not_an_input  # noqa: E402

ARITH = re.compile(r"What is (\d+) ([+*]) (\d+)\?")


def patch_size_of(run_dir: Path) -> int | None:
    """The fixed patch size from the run's config.json (1 for byte patching); None when patches are not fixed."""
    cfg = run_dir / "config.json"
    if not cfg.is_file():
        return None
    m = json.loads(cfg.read_text()).get("model_config") or {}
    if m.get("model") in ("dense", "mamba", "bpe") or m.get("patching") == "byte":
        return 1 if m.get("patching") == "byte" else None
    return int(m["fixed_patch_size"]) if m.get("patching") == "fixed" else None


def carries_in(a: int, b: int) -> list[int]:
    """carries_in(a, b)[k]: 1 when a carry comes into place k (k = 0: units) of a + b."""
    out, c, k = [], 0, 0
    while a or b or c or k == 0:
        out.append(c)
        s = a % 10 + b % 10 + c
        c, a, b, k = s // 10, a // 10, b // 10, k + 1
    return out


def first_wrong(output: str, answer: str) -> int | None:
    """Index of the first byte where output leaves answer (len(answer) when the output only runs on); None if equal."""
    for i, (o, t) in enumerate(zip(output, answer)):
        if o != t:
            return i
    return None if output == answer else min(len(output), len(answer))


def analyse(rows: list[dict], patch: int | None) -> dict:
    """Per (task, digits) cell of the arithmetic rows: counts of each kind of first error (see the module doc)."""
    cells: dict = {}
    for r in rows:
        m = ARITH.search(r["prompt"])
        if r["task"] not in ("add", "mul") or not m:
            continue
        c = cells.setdefault((r["task"], int(r["digits"])), {
            "n": 0, "correct": 0, "length": 0, "same_len": 0, "place": Counter(), "carry_in": 0,
            "carry_lost": 0, "carry_extra": 0, "patch_pos_err": Counter(), "patch_pos_all": Counter()})
        ans, out = r["answer"], r["output"]
        c["n"] += 1
        if patch:
            c["patch_pos_all"].update((r["answer_at"] + j) % patch for j in range(len(ans)))
        if r["correct"]:
            c["correct"] += 1
            continue
        i = first_wrong(out, ans)
        if i is None:  # the same digits, judged wrong by the stop rule (no stop byte right after them)
            i = len(ans)
        if patch:
            c["patch_pos_err"][(r["answer_at"] + i) % patch] += 1
        if len(out) != len(ans) or not out.isdigit():  # digits out of line: no place to compare
            c["length"] += 1
            continue
        c["same_len"] += 1
        if i < len(ans):
            place = len(ans) - i  # 1 = units
            c["place"][place] += 1
            if m.group(2) == "+":
                cin = carries_in(int(m.group(1)), int(m.group(3)))
                has = cin[place - 1] if place - 1 < len(cin) else 0
                c["carry_in"] += has
                d_out, d_ans = int(out[i]), int(ans[i])
                c["carry_lost"] += has and d_out == (d_ans - 1) % 10
                c["carry_extra"] += (not has) and d_out == (d_ans + 1) % 10
    return cells


def _pct(k: int, n: int) -> str:
    return f"{k} ({100 * k / n:.0f} %)" if n else "0"


def render(name: str, cells: dict, patch: int | None) -> str:
    lines = [f"### {name}" + (f" (fixed {patch}-byte patches)" if patch else ""), "",
             "| task | digits | n | correct | wrong | length wrong | same length | first wrong place (1 = units) | "
             "carry into it | carry lost / extra |", "|---|---|---|---|---|---|---|---|---|---|"]
    for (task, d), c in sorted(cells.items()):
        wrong = c["n"] - c["correct"]
        places = ", ".join(f"{p}: {k}" for p, k in sorted(c["place"].items())) or "-"
        carry = (_pct(c["carry_in"], sum(c["place"].values())) if task == "add" else "-")
        lost = f"{c['carry_lost']} / {c['carry_extra']}" if task == "add" else "-"
        lines.append(f"| {task} | {d} | {c['n']} | {c['correct']} | {wrong} | {_pct(c['length'], wrong)} | "
                     f"{_pct(c['same_len'], wrong)} | {places} | {carry} | {lost} |")
    if patch and patch > 1:
        lines += ["", "First wrong byte's place in its patch (0 = the patch's first byte) beside all answer bytes' "
                  "places. Every prompt of a cell has the same length, so within a cell a byte's place in its patch "
                  "follows from its place in the answer: this does not separate the two.", "", "| task | digits | " + " | ".join(f"place {p}: errors / all" for p in range(patch))
                  + " |", "|---|---|" + "---|" * patch]
        for (task, d), c in sorted(cells.items()):
            ne, na = sum(c["patch_pos_err"].values()), sum(c["patch_pos_all"].values())
            lines.append(f"| {task} | {d} | " + " | ".join(
                f"{_pct(c['patch_pos_err'][p], ne)} / {100 * c['patch_pos_all'][p] / max(na, 1):.0f} %"
                for p in range(patch)) + " |")
    return "\n".join(lines) + "\n"


def _outputs_file(p: Path) -> tuple[Path, Path]:
    f = p / OUTPUTS_FILE if p.is_dir() else p
    if not f.is_file():
        raise UserError(f"{p}: no {OUTPUTS_FILE} there (task stages since 2026-12-05 write it beside tasks.json); "
                        "pass a run folder with one, or the file itself")
    return f, f.parent


def provenance(runs: list[str], argv: list[str] | None) -> str:
    """Which command wrote the tables, and where each run's answers came from (the task stage's device, date and
    commit, from its tasks.json): a results page without them cannot be traced (the project's rule)."""
    import shlex
    import subprocess

    args = sys.argv[1:] if argv is None else argv
    try:
        tree = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parents[1]).stdout.strip() or "unknown"
    except OSError:
        tree = "unknown"
    lines = [f"Generated by `python scripts/task_errors.py {shlex.join(args)}` (tree {tree}; a count over the kept "
             "answers on the CPU, no model run). The answers:"]
    for r in runs:
        f, run_dir = _outputs_file(Path(r))
        try:
            t = json.loads((run_dir / "tasks.json").read_text())
            dev, sha = t.get("device") or {}, (t.get("git") or {}).get("sha") or "unknown"
            lines.append(f"- {f}: task stage on {dev.get('name') or dev.get('type') or 'unknown'} "
                         f"(torch {dev.get('torch', '?')}), {t.get('date', '?')}, commit {sha[:10]}")
        except (OSError, ValueError, AttributeError):
            lines.append(f"- {f}: no readable tasks.json beside it (device, date and commit unknown)")
    return "\n".join(lines) + "\n\n"


@cli_entry
def main(argv: list[str] | None = None) -> None:
    ap = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run folders (with task_outputs.jsonl.gz) or the files themselves")
    ap.add_argument("--patch_size", type=int, default=None,
                    help="fixed patch size (default: from each run's config.json; none when patches are not fixed)")
    ap.add_argument("--out", default=None, help="write the Markdown here too")
    a = ap.parse_args(argv)
    check_ranges(a, {"patch_size": 1})
    if a.out:  # checked before the work; written atomically
        found = [_outputs_file(Path(r)) for r in a.runs]
        out_not_an_input(a.out, [f for f, _ in found] + [d / "config.json" for _, d in found])
    parts = []
    for r in a.runs:
        f, run_dir = _outputs_file(Path(r))
        patch = a.patch_size or patch_size_of(run_dir)
        try:
            rows = read_outputs(f)
        except (OSError, EOFError, ValueError) as e:
            raise UserError(f"{f}: not a readable {OUTPUTS_FILE} ({e}); pass the file the task stage wrote") from None
        parts.append(render(str(r), analyse(rows, patch), patch))
    md = provenance(a.runs, argv) + "\n".join(parts)
    print(md, end="")
    if a.out:
        atomic_write(a.out, md)


if __name__ == "__main__":
    main()
