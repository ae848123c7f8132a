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

import argparse
import json
import statistics
from pathlib import Path


def records(run_dir: Path) -> list[dict]:
    from ionllama.train.metrics import read_metrics  # metrics.jsonl or its .gz copy

    return read_metrics(run_dir)


def summarize(recs: list[dict], gpus: int) -> dict:
    win = [r for r in recs if r.get("phase") == "main" and "bytes_per_s" in r and "loss" in r]
    steady = win[2:] if len(win) > 4 else win
    bps = statistics.median(r["bytes_per_s"] for r in steady) if steady else None
    return {"gpus": gpus, "main_windows": len(win), "bytes_per_s": bps,
            "bytes_per_s_per_gpu": bps / gpus if bps else None,
            "last_step": max((r["step"] for r in recs if "step" in r), default=None),
            "losses": {r["step"]: r["loss"] for r in recs if "loss" in r and "bytes_per_s" in r}}


def parse_run(spec: str) -> tuple[str, Path, int]:
    name, _, rest = spec.partition("=")
    path, _, gpus = rest.partition(":")
    return name, Path(path), int(gpus or 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", required=True, help="NAME=DIR[:GPUS], the reference run")
    ap.add_argument("--run", action="append", default=[], help="NAME=DIR[:GPUS] (repeatable)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    bname, bdir, bgpus = parse_run(a.base)
    base = summarize(records(bdir), bgpus)
    out = {"base": bname, "runs": {bname: {k: v for k, v in base.items() if k != "losses"}}}
    for spec in a.run:
        name, d, gpus = parse_run(spec)
        s = summarize(records(d), gpus)
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
        Path(a.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
