"""Compare training runs from their metrics.jsonl: throughput, scaling and loss curves (issues #6, #7).

    python benchmarks/compare_runs.py --base plain=CK/plain --run ddp2=CK/ddp2:2 --run fsdp2=CK/fsdp2:2 \
        --run resumed1=CK/resumed1 --out results.json

A run is NAME=DIR[:GPUS]. Throughput is the median bytes/s of the main-phase log windows after the
first two (compilation and warm-up land there); bytes/s is global (all ranks), per GPU divides by GPUS.
Scaling efficiency = run bytes/s / (GPUS x base bytes/s per GPU). Loss: the largest |difference| from the
base run's training loss at the steps both logged (same global batch, same data: they should agree
within bf16 noise).
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the usage above runs without PYTHONPATH
from ionllama.errors import OneLineParser, UserError, cli_entry  # noqa: E402
from ionllama.fsutil import atomic_write, out_not_an_input  # noqa: E402


def records(run_dir: Path, flag: str) -> list[dict]:
    from ionllama.train.metrics import read_metrics  # metrics.jsonl or its .gz copy

    try:
        recs = read_metrics(run_dir)
    except FileNotFoundError:
        raise UserError(f"{flag}: no metrics.jsonl(.gz) in {run_dir}; give a run's folder as DIR") from None
    except (OSError, EOFError) as e:  # unreadable, or a corrupt / cut .gz
        raise UserError(f"{flag}: cannot read the metrics in {run_dir} ({e}); give a run's folder") from None
    if not recs:  # e.g. a file that is not a metrics log: every line skipped
        raise UserError(f"{flag}: {run_dir} holds no metrics records; give a run's folder (its metrics.jsonl)")
    return recs


def summarize(recs: list[dict], gpus: int) -> dict:
    win = [r for r in recs if r.get("phase") == "main" and "bytes_per_s" in r and "loss" in r]
    steady = win[2:] if len(win) > 4 else win
    bps = statistics.median(r["bytes_per_s"] for r in steady) if steady else None
    return {"gpus": gpus, "main_windows": len(win), "bytes_per_s": bps,
            "bytes_per_s_per_gpu": bps / gpus if bps else None,
            "last_step": max((r["step"] for r in recs if "step" in r), default=None),
            "losses": {r["step"]: r["loss"] for r in recs if "loss" in r and "bytes_per_s" in r}}


def parse_run(spec: str) -> tuple[str, Path, int]:
    name, eq, rest = spec.partition("=")
    path, _, gpus = rest.partition(":")
    if not (eq and name and path) or not (gpus or "1").isdigit() or int(gpus or 1) < 1:
        raise UserError(f"'{spec}' is not NAME=DIR[:GPUS] (GPUS a whole number, at least 1); e.g. ddp2=runs/ddp2:2")
    return name, Path(path), int(gpus or 1)


@cli_entry
def main(argv=None) -> None:
    ap = OneLineParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", required=True, help="NAME=DIR[:GPUS], the reference run")
    ap.add_argument("--run", action="append", default=[], help="NAME=DIR[:GPUS] (repeatable)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    specs = [parse_run(spec) for spec in [a.base, *a.run]]  # every spec checked before any run is read
    if a.out:  # its own inputs refused (it wrote the JSON over a run's metrics.jsonl, exit 0)
        from ionllama.train.metrics import metrics_file

        out_not_an_input(a.out, [f for _, d, _ in specs if (f := metrics_file(d)) is not None])
    bname, bdir, bgpus = specs[0]
    base = summarize(records(bdir, f"--base {a.base}"), bgpus)
    out = {"base": bname, "runs": {bname: {k: v for k, v in base.items() if k != "losses"}}}
    for spec, (name, d, gpus) in zip(a.run, specs[1:]):
        s = summarize(records(d, f"--run {spec}"), gpus)
        common = sorted(set(s["losses"]) & set(base["losses"]))
        row = {k: v for k, v in s.items() if k != "losses"}
        if s["bytes_per_s"] and base["bytes_per_s_per_gpu"]:
            row["scaling_efficiency"] = s["bytes_per_s"] / (gpus * base["bytes_per_s_per_gpu"])
        row["loss_steps_compared"] = len(common)
        if common:
            row["loss_max_abs_diff"] = max(abs(s["losses"][t] - base["losses"][t]) for t in common)
            row["loss_steps"] = [common[0], common[-1]]
        out["runs"][name] = row
    text = json.dumps(out, indent=1)
    print(text)
    if a.out:
        atomic_write(a.out, text + "\n")


if __name__ == "__main__":
    main()
