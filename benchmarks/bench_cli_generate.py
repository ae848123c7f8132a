"""Bytes per second of `ionllama generate` itself, the streamed path users run (issue #4).

bench_generation.py times `model.generate()` in one process. The CLI streams: it asks for bytes as they come and
prints them, and until the forty-eighth session it never captured its CUDA graphs (it asked the runner for one
byte a run, and capture needs a longer run). This script runs the CLI as a user would, in a fresh process per
length, and takes the steady rate from two lengths, so model loading, compiling and capturing (the same at both
lengths) cancel out:

    rate = (bytes_long - bytes_short) / (wall_long - wall_short)

A warm-up run of the short length goes first, so torch.compile's on-disk cache is warm for the timed runs. Each
run also keeps the CLI's own `--stats` rate after its first run (compiling and capturing happen there), which is
not blurred by the process's start-up: that varied by over a second between processes on an H100 (fiftieth session),
as much as the two lengths' whole difference at compiled speed.
--in_process adds the same two-length rate of `model.generate()` in this process (after a warm-up of both lengths:
their caches are different shapes, each compiled once), with a stream callback (as the
CLI) and without (as bench_generation.py, which reads the bytes every 16): where the CLI is slow, is it the
streaming, or the process around it?

    python benchmarks/bench_cli_generate.py --checkpoint ck/run/final.pt --lengths 512 8192 --compile default \
        --out docs/results/cli_generate.json

--each_line N adds one more process: `ionllama generate --each_line` fed N prompts (the prompt, numbered) of the
short length each, whose `--stats` lines give each line's seconds: the first holds compiling and capturing, the later
ones run on the kept decoder and graphs (a DecodeSession) where a process per prompt would start, load, compile and
capture again.

The end-of-document byte 0x00 ends a run early, and a barely trained model samples it (a 5-step `--size small`
model stopped at byte 361 with --top_k 20 on an H100, the forty-ninth session): the bytes actually written
(--output) are what is counted, and where the long run stopped as early as the short one no rate is given.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ionllama.errors import OneLineParser, UserError, cli_entry
from ionllama.eval.benchmark import git_commit
from ionllama.fsutil import atomic_write


def run_cli(checkpoint: str, n: int, args, out_file: Path) -> dict:
    """One `ionllama generate` process: its wall time and the bytes it wrote."""
    cmd = [sys.executable, "-m", "ionllama.cli", "generate", "--checkpoint", checkpoint, "--prompt", args.prompt,
           "--max_new_bytes", str(n), "--seed", str(args.seed), "--device", args.device, "--dtype", args.dtype,
           "--compile", args.compile,
           "--no_prompt_echo", "--stats", "--output", str(out_file)]
    if args.top_k:
        cmd += ["--top_k", str(args.top_k)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no stderr)"])[-1]
        raise UserError(f"`ionllama generate` exited with {proc.returncode}: {tail}")
    # the CLI's own --stats line: its generation time (compile and capture in, loading out) and the CUDA graphs
    stats = [line for line in proc.stderr.splitlines() if line.startswith("[generate]")]
    # its rate after the first run (which holds compiling and capturing), when it printed one
    steady = re.search(r"; ([\d,]+) bytes/s after the first run", stats[-1]) if stats else None
    return {"max_new_bytes": n, "bytes": out_file.stat().st_size, "wall_s": round(wall, 3),
            "cli_stats": stats[-1] if stats else None,
            "cli_steady_bytes_per_s": int(steady.group(1).replace(",", "")) if steady else None}


def run_each_line(checkpoint: str, n: int, lines: int, args) -> dict:
    """One `ionllama generate --each_line` process fed `lines` prompts of n new bytes each: each line's seconds and
    bytes from its --stats line, and the process's wall time."""
    cmd = [sys.executable, "-m", "ionllama.cli", "generate", "--checkpoint", checkpoint, "--each_line",
           "--max_new_bytes", str(n), "--seed", str(args.seed), "--device", args.device, "--dtype", args.dtype,
           "--compile", args.compile, "--stats"] + (["--top_k", str(args.top_k)] if args.top_k else [])
    prompts = "".join(f"{args.prompt}{i}\n" for i in range(lines))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, input=prompts, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no stderr)"])[-1]
        raise UserError(f"`ionllama generate --each_line` exited with {proc.returncode}: {tail}")
    stats = [line for line in proc.stderr.splitlines() if line.startswith("[generate]")]
    each = [re.match(r"\[generate\] ([\d,]+) new bytes in ([\d.]+) s", line) for line in stats]
    rows = [{"bytes": int(m.group(1).replace(",", "")), "seconds": float(m.group(2)), "stats": line}
            for m, line in zip(each, stats) if m]
    later = sorted(r["seconds"] for r in rows[1:])
    return {"lines": lines, "max_new_bytes": n, "wall_s": round(wall, 3), "each": rows,
            "first_line_s": rows[0]["seconds"] if rows else None,
            "later_lines_median_s": later[len(later) // 2] if later else None}


def in_process_rates(args, short: int, long_: int) -> dict:
    """generate()'s steady bytes/s in this process, streamed and not, from the same two lengths (each call builds
    its runner and captures again, which the difference cancels)."""
    import torch

    from ionllama.generation.cli import load_checkpoint_model, resolve_dtype

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_checkpoint_model(args.checkpoint, device, resolve_dtype(args.dtype, device))  # as the CLI
    kw = {"top_k": args.top_k or None, "seed": args.seed}
    if args.compile != "none":
        kw["compile"] = args.compile
    rates = {}
    for label, stream in (("streamed", lambda row, chunk: None), ("not_streamed", None)):
        for n in (short, long_):  # warm-up: each length's caches are their own shapes for a compiled step
            model.generate(args.prompt.encode(), max_new_bytes=n, stream=stream, **kw)
        walls, sizes = [], []
        for n in (short, long_):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = model.generate(args.prompt.encode(), max_new_bytes=n, stream=stream, **kw)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            walls.append(time.perf_counter() - t0)
            sizes.append(len(out))
        extra_b, extra_t = sizes[1] - sizes[0], walls[1] - walls[0]
        rates[label] = {"bytes": sizes, "wall_s": walls,
                        "steady_bytes_per_s": extra_b / extra_t if extra_b > 0 and extra_t > 0 else None}
        print(f"in process, {label}: {sizes} B in {[round(w, 2) for w in walls]} s", flush=True)
    return rates


@cli_entry
def main(argv=None) -> int:
    p = OneLineParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--lengths", type=int, nargs=2, default=[512, 8192], metavar=("SHORT", "LONG"))
    p.add_argument("--compile", default="none", choices=["none", "default", "max-autotune"])
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"], help="the CLI's --dtype")
    p.add_argument("--prompt", default="The ")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--top_k", type=int, default=20, help="0: off (default: 20, keeps 0x00 out of a weak model)")
    p.add_argument("--repeats", type=int, default=1, help="timed pairs; the rate is each pair's, min/median kept")
    p.add_argument("--in_process", action="store_true",
                   help="also model.generate() in this process, streamed and not (same lengths)")
    p.add_argument("--each_line", type=int, default=0, metavar="N",
                   help="also one `ionllama generate --each_line` process fed N prompts of the short length: each "
                        "line's seconds (0: off)")
    p.add_argument("--out", default=None, help="JSON file (default: print only)")
    args = p.parse_args(argv)
    if args.each_line < 0:
        raise UserError(f"--each_line {args.each_line}: give a number of prompt lines >= 1, or 0 for none")
    short, long_ = args.lengths
    if not 0 < short < long_:
        raise UserError(f"--lengths {short} {long_}: need 0 < SHORT < LONG, e.g. --lengths 512 8192")
    if not Path(args.checkpoint).exists():
        raise UserError(f"--checkpoint {args.checkpoint}: no such file; train one first (ionllama train ...)")
    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / "gen.bin"
        warm = run_cli(args.checkpoint, short, args, f)
        pairs = []
        for _ in range(args.repeats):
            a, b = run_cli(args.checkpoint, short, args, f), run_cli(args.checkpoint, long_, args, f)
            extra_b, extra_t = b["bytes"] - a["bytes"], b["wall_s"] - a["wall_s"]
            # no rate when the long run stopped as early as the short one (0x00) or was not slower
            rate = extra_b / extra_t if extra_b > 0 and extra_t > 0 else None
            pairs.append({"short": a, "long": b, "steady_bytes_per_s": rate})
            own = b["cli_steady_bytes_per_s"]
            print(f"short {a['bytes']} B in {a['wall_s']:.2f} s, long {b['bytes']} B in {b['wall_s']:.2f} s: "
                  + (f"{rate:,.0f} bytes/s" if rate else "no rate (the long run stopped early)")
                  + (f"; the long run's own --stats rate after its first run: {own:,} bytes/s" if own else ""),
                  flush=True)
        each_line = run_each_line(args.checkpoint, short, args.each_line, args) if args.each_line else None
        if each_line:
            print(f"--each_line: {len(each_line['each'])} lines in one process ({each_line['wall_s']:.2f} s): first "
                  f"{each_line['first_line_s']} s, later median {each_line['later_lines_median_s']} s", flush=True)
    rates = sorted(r["steady_bytes_per_s"] for r in pairs if r["steady_bytes_per_s"])
    # the long runs' own rates after their first run: no process start-up in them (fiftieth session: the reliable one)
    own_rates = sorted(r["long"]["cli_steady_bytes_per_s"] for r in pairs if r["long"]["cli_steady_bytes_per_s"])
    in_process = in_process_rates(args, short, long_) if args.in_process else None
    result = {"benchmark": "bench_cli_generate", "commit": git_commit(), "argv": sys.argv[1:],
              "device_flag": args.device, "dtype_flag": args.dtype, "compile": args.compile, "warmup": warm,
              "pairs": pairs,
              "steady_bytes_per_s_min": rates[0] if rates else None,
              "steady_bytes_per_s_median": rates[len(rates) // 2] if rates else None,
              "cli_steady_bytes_per_s_median": own_rates[len(own_rates) // 2] if own_rates else None,
              "in_process": in_process, "each_line": each_line,
              "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
    if args.out:
        atomic_write(args.out, json.dumps(result, indent=1).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
