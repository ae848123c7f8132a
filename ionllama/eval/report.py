"""results.json -> Markdown. Measured rows (this project's checkpoints) and published figures (with
citation and dataset, from docs/results/published.json) are rendered in separate tables, never mixed.

    python -m ionllama.eval.report results.json [more_results.json ...] [--published PATH] [--output table.md]
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import OneLineParser, UserError, cli_entry
from ..fsutil import atomic_write

SCHEMA_VERSION = 1
TASK_ORDER = ("count", "spell", "reverse", "add", "mul")
DEFAULT_PUBLISHED = Path(__file__).resolve().parents[2] / "docs" / "results" / "published.json"


def _f(v, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if abs(v) >= 1e5:
            return f"{v:,.0f}"
        return f"{v:.{digits}f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _num(v, spec: str, suffix: str = "") -> str:
    """v formatted by spec, or "-" for None: benchmark.py's _clean writes a NaN as null, and `None:.2f` raised."""
    return "-" if v is None else f"{v:{spec}}{suffix}"


def _acc(rec: dict | None) -> str:
    if not rec or not rec.get("n"):
        return "-"
    lo, hi = rec["ci95"]
    return f"{100 * rec['accuracy']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] (n={rec['n']})"


def _majority(rec: dict) -> str:
    mb = rec.get("majority_baseline")
    if not mb:
        return "-"
    return f"{100 * mb['accuracy']:.1f}% " + (f"('{mb['answer']}')" if mb["answer"] is not None else "(all answers differ)")


def _table(header: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(_f(c) if not isinstance(c, str) else c for c in r) + " |" for r in rows]
    return out + [""]


# ------------------------------------------------------------------ published figures


def load_published(path: str | Path | None) -> list[dict]:
    """Entries with a citation (paper + table/section) and the dataset they were measured on.
    An entry without them is an error: a number without a source must not reach the table."""
    if path is None:
        return []
    p = Path(path)
    if not p.is_file():
        if p == Path(DEFAULT_PUBLISHED):
            return []
        raise UserError(f"--published {p}: no such file; pass a published-figures JSON or --published ''")
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{p} is not valid JSON ({e}); fix the file or pass --published ''") from None
    except OSError as e:  # unreadable: a PermissionError traceback
        raise UserError(f"--published {p}: cannot read it ({e.strerror or e}); check its permissions") from None
    entries = doc.get("entries", []) if isinstance(doc, dict) else None
    if not isinstance(entries, list):
        raise UserError(f"{p} must be an object with an 'entries' list; see docs/results/README.md")
    for i, e in enumerate(entries):
        cit = e.get("citation") if isinstance(e, dict) else None
        problems = [k for k in ("model", "metric", "dataset") if not (isinstance(e, dict) and e.get(k))]
        if not isinstance(e, dict) or not isinstance(e.get("value"), (int, float)):
            problems.append("value (a number)")
        if not isinstance(cit, dict) or not cit.get("paper") or not (cit.get("table") or cit.get("section")
                                                                       or cit.get("figure")):
            problems.append("citation.paper + citation.table/section/figure")
        if problems:
            raise UserError(f"{p}: entry {i} lacks {', '.join(problems)}; published figures need a source and a dataset")
    return entries


def published_section(entries: list[dict]) -> list[str]:
    lines = ["## Published figures (not measured here)", "",
             "Copied from the cited papers; measured on *their* datasets and setups, so not directly comparable "
             "with the measured rows above.", ""]
    if not entries:
        return lines + ["_None recorded yet (docs/results/published.json)._", ""]
    rows = []
    for e in entries:
        c = e["citation"]
        where = c.get("table") or c.get("section") or c.get("figure")
        cite = f"{c['paper']}, {where}" + (f" ({c['url']})" if c.get("url") else "")
        rows.append([e["model"], e["metric"], _f(float(e["value"])) + (f" {e['unit']}" if e.get("unit") else ""),
                     e["dataset"], cite, e.get("note", "")])
    return lines + _table(["model", "metric", "value", "dataset", "source", "note"], rows)


# ------------------------------------------------------------------ measured rows


def _task_acc(results: dict, task: str) -> str:
    t = results.get("metrics", {}).get("tasks")
    if not t:
        return "-"
    rec = t["per_task"].get(task)
    return f"{100 * rec['accuracy']:.1f}%" if rec and rec.get("n") else "-"


def _window(lm: dict, r: dict) -> str:
    if not lm.get("seq_len"):
        return "-"
    unit = "tokens" if "tokens" in str(lm.get("method", "")) or (r.get("model") or {}).get("name") == "bpe" \
        else "bytes"
    return f"{lm['seq_len']} {unit}"


def measured_rows(results_list: list[dict]) -> list[str]:
    # bytes scored and window beside the BPB: rows of 299 bytes in 32-byte windows and 1,999 in 128-token windows
    # stood side by side as one "eval data" (a new user's audit)
    header = ["model", "params", "checkpoint", "eval data", "bytes scored", "window", "BPB", "bytes/patch",
              "fwd bytes/s", "device", "tasks label", "tasks split"] + list(TASK_ORDER)
    rows = []
    for r in results_list:
        m = r.get("metrics", {})
        lm, sp = m.get("lm") or {}, (m.get("speed") or {})
        comp = m.get("compression") or {}
        rows.append([f"{r['model']['name']} {r['model']['size']}", r["model"].get("params_total"),
                     (r.get("checkpoint") or {}).get("path") or "random init", Path(lm.get("data", "-")).name,
                     lm.get("bytes"), _window(lm, r), lm.get("bpb"),
                     comp.get("bytes_per_patch", lm.get("bytes_per_patch")),
                     sp.get("forward_bytes_per_s"), (r.get("device") or {}).get("name", "-"),
                     (m.get("tasks") or {}).get("label", "-"), (m.get("tasks") or {}).get("split", "-")]
                    + [_task_acc(r, t) for t in TASK_ORDER])
    # the split is a column: a --task_split val row was headed "accuracies on the held-out test split" (an audit)
    return ["## Measured (this project)", "",
            "Every row was produced by `ionllama bench` on the checkpoint named; task accuracies on the split named.",
            ""] + _table(header, rows)


# ------------------------------------------------------------------ one run


def render_markdown(res: dict, baselines: list[dict] | None = None, published: list[dict] | None = None,
                    plots: dict | None = None) -> str:
    m = res["metrics"]
    mod = res["model"]
    ck = res.get("checkpoint") or {}
    L = [f"# Benchmark: {mod['name']} {mod['size']} ({_f(mod.get('params_total'))} parameters)", "",
         f"- checkpoint: `{ck.get('path') or 'none (random init)'}`" + (f", step {ck['step']}" if ck.get("step") else "")
         + (f", phase {ck['phase']}" if ck.get("phase") else "")
         + (" (**phase 1: only the entropy model trained; the main model is at its initialisation**)"
            if ck.get("phase") == "entropy" else ""),
         f"- device: {res['device'].get('name')} ({res['device'].get('type')}), torch {res['device'].get('torch')}",
         f"- date: {res['date']}, commit: `{res['commit'].get('sha', 'unknown')}`"
         + (" (uncommitted changes)" if res["commit"].get("dirty") else ""),
         f"- command: `{res['command']}`", f"- schema_version: {res['schema_version']}", ""]
    for name, why in (res.get("skipped") or {}).items():
        L.append(f"- skipped {name}: {why}")
    if res.get("skipped"):
        L.append("")

    if m.get("lm"):
        lm = m["lm"]
        L += ["## Language modelling", ""]
        L += _table(["eval data", "bytes scored", "BPB", "PPL (per byte)", "bytes/patch", "seq_len", "method"],
                    [[f"`{lm['data']}`", lm["bytes"], lm["bpb"], lm["ppl"], lm.get("bytes_per_patch"),
                      lm.get("seq_len"), lm.get("method", "-")]])

    if m.get("tasks"):
        t = m["tasks"]
        L += [f"## Tasks: {t['label']}", "", f"{t['note']}. Split `{t['split']}`, {t['shots']} shots, "
              f"seed {t['seed']}; {t['scoring']}. Generation: {t['generation']}.", ""]
        rows = [[k, _acc(v), _majority(v)] for k, v in t["per_task"].items()]
        L += _table(["task", "accuracy [95% CI] (n)", "always the most common answer"], rows)
        arith = {k: v for k, v in t["per_task"].items() if "by_digits" in v}
        if arith:
            digits = sorted({int(d) for v in arith.values() for d in v["by_digits"]})
            L += ["### Arithmetic by operand digit count", ""]
            L += _table(["task"] + [f"{d} digit{'s' if d > 1 else ''}" for d in digits],
                        [[k] + [_acc(v["by_digits"].get(str(d))) for d in digits] for k, v in arith.items()])

    if m.get("speed"):
        s = m["speed"]
        g = s.get("generation") or {}
        L += ["## Speed", ""]
        rows = [["forward throughput (no grad)", f"{_f(s['forward_bytes_per_s'])} bytes/s",
                 f"batch {s['batch_size']} x {s['seq_len']} {s.get('unit', 'bytes')}, amp {s['amp']}"]]
        if s.get("train_step_bytes_per_s"):
            rows.append(["forward+backward throughput", f"{_f(s['train_step_bytes_per_s'])} bytes/s", "same batch"])
        lat = s["latency_ms"]
        rows.append(["latency", _num(lat.get("median"), ".2f", " ms"),
                     f"batch 1 x {lat['input_bytes']} bytes (median)"])
        if g.get("bytes_per_s"):
            rows.append(["generation", f"{_f(g['bytes_per_s'])} bytes/s",
                         f"greedy, batch 1, {g['new_bytes']} new bytes after {g['prompt_bytes']}"
                         + (" (stopped early at DOC_SEP)" if g.get("stopped_early") else "")])
        elif g.get("skipped"):
            rows.append(["generation", "-", g["skipped"]])
        elif g:
            rows.append(["generation", "-", "the model ended the document (DOC_SEP) at once; no bytes to time"])
        L += _table(["metric", "value", "setting"], rows)
    if m.get("memory"):
        mem = m["memory"]
        L += ["## Memory", ""]
        # a null (a NaN written by _clean) is shown as "-", not left out of the table
        L += _table(["metric", "MiB"], [[k, v] for k, v in mem.items() if v is None or isinstance(v, (int, float))])
        L += [f"({mem.get('kind')})", ""]

    if m.get("compression"):
        c = m["compression"]
        L += ["## Compression (patching)", "",
              f"Mean {_num(c.get('bytes_per_patch'), '.3f')} bytes/patch over {_f(c['bytes'])} bytes"
              + (f" in windows of {c['window']}" if c.get("window") else "") + f" (from `{c['source']}`).", ""]
        total = sum(c["histogram"].values()) or 1
        L += _table(["patch size"] + list(c["histogram"]),
                    [["share"] + [f"{100 * v / total:.1f}%" for v in c["histogram"].values()]])

    if m.get("multilingual"):
        ml = m["multilingual"]
        bpe = ml.get("bpe") or {}
        L += ["## Multilingual", ""]
        for g in ml["groups"]:
            L += [f"`{g['dir']}`" + (" — the same content in every language: total bits compare languages fairly"
                                     if g["parallel"] else ""), ""]
            hdr = ["language", "bytes", "BPB", "bytes/patch", "total kbit"]
            if g["parallel"]:  # the ratio is against english when there is one, else the group's recorded reference
                hdr.append(f"bits vs {g.get('reference') or 'english'}")
            hdr += ["BPE tokens", "bytes/token"]
            rows = []
            for name, r in g["languages"].items():
                bits = r.get("total_bits")
                row = [name, r["bytes"], r["bpb"], r["bytes_per_patch"], None if bits is None else bits / 1000]
                if g["parallel"]:
                    row.append(_num(r.get("total_bits_vs_english"), ".2f", "x"))
                row += [r.get("bpe_tokens"), r.get("bytes_per_bpe_token")]
                rows.append(row)
            L += _table(hdr, rows)
            cut = [n for n, r in g["languages"].items() if r.get("truncated")]
            if cut:
                L += [f"**Truncated to {ml['max_lang_bytes']:,} bytes: {', '.join(cut)}**"
                      + (" — the totals above do not cover the same content; raise --max_lang_bytes."
                         if g["parallel"] else "."), ""]
            if g.get("empty_files"):  # said, not dropped: a language missing from the table had no word
                L += [f"Empty, not scored: {', '.join(g['empty_files'])}.", ""]
        L += [f"BPE token counts: {bpe.get('source', 'not computed')}"
              + (f", vocab {bpe['vocab_size']}" if bpe.get("vocab_size") else "") + ".", ""]

    L += measured_rows([res] + list(baselines or []))
    L += published_section(list(published or []))
    if plots:
        L += ["## Plots", ""] + [f"![{k}]({Path(v).name})" for k, v in plots.items()] + [""]
    return "\n".join(L)


def load_results(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"results file '{p}' not found; pass a results.json written by `ionllama bench`")
    try:
        r = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{p} is not valid JSON ({e}); re-run `ionllama bench`") from None
    except OSError as e:
        raise UserError(f"results file '{p}': cannot read it ({e.strerror or e}); check its permissions") from None
    if not isinstance(r, dict) or "schema_version" not in r or "metrics" not in r:
        raise UserError(f"{p} is not a benchmark results.json (no schema_version/metrics)")
    # the fields the tables read, checked here: a hand-edited or foreign file was a KeyError / TypeError traceback
    v, model = r["schema_version"], r.get("model")
    if not isinstance(v, int) or isinstance(v, bool) or not isinstance(r["metrics"], dict) \
            or not isinstance(model, dict) or not {"name", "size"} <= set(model):
        raise UserError(f"{p} is not a benchmark results.json (schema_version must be a whole number, metrics an "
                        "object, model an object with name and size); re-run `ionllama bench`")
    if v > SCHEMA_VERSION:
        raise UserError(f"{p} has schema_version {v} > {SCHEMA_VERSION}; update ionllama")
    return r


@cli_entry
def main(argv: list[str] | None = None) -> int:
    ap = OneLineParser(prog="python -m ionllama.eval.report", description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="+", help="results.json files; one table row each")
    ap.add_argument("--published", default=str(DEFAULT_PUBLISHED), help="published figures with citations")
    ap.add_argument("--output", default=None, help="write the Markdown here (default: print)")
    a = ap.parse_args(argv)
    res = [load_results(p) for p in a.results]
    text = "\n".join(measured_rows(res) + published_section(load_published(a.published or None)))
    if a.output:
        try:
            atomic_write(a.output, text)
        except OSError as e:
            raise UserError(f"cannot write --output {a.output} ({e.strerror or e}); pass a file in a writable "
                            "folder") from None
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
