"""Where does a `generate()` call's time go, call after call in one process? (issue #4)

The fiftieth session saw a 1-byte prompt's first `generate()` take ~4 s on CUDA although its first decode run took
0.045 s: the time went before the decode loop, after other prompt lengths had already run. This script calls
`generate()` once per prompt length in --lengths, in that order, in one process (random weights, real text
prompts), and keeps each call's `return_info["decode"]` timings: setup_s (decoder, prefill, runner: where a new
prompt length's Triton compiles or autotunes would show), first_run_s (compiling, capturing) and rest_s, plus the
whole call's wall time. --session passes one DecodeSession to every call (kept decoder and graphs).

    PYTHONPATH=. python3 benchmarks/time_generate_calls.py --model_config docs/results/phase1-dropout/ionllama_fixed/config.json \
        --lengths 17,1,4,1,300,17 --out $OUT/calls.json

On CPU (tests): --device cpu --size tiny, eager.
"""
from __future__ import annotations

import json
import pathlib
import sys
import time

import torch

from ionllama import create_model
from ionllama.registry import build_model
from ionllama.errors import OneLineParser, UserError, check_ranges, cli_entry
from ionllama.eval.benchmark import device_name, git_commit
from ionllama.fsutil import atomic_write, ready_out_dir
from ionllama.generation import DecodeSession, generate

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _checks import int_list  # noqa: E402
from bench_generation import add_model_config_arg, model_config_from  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TEXT = (b"It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
        b"foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light. ")


def prompt(n: int) -> bytes:
    return (TEXT * (n // len(TEXT) + 1))[:n]


def build_parser() -> OneLineParser:
    ap = OneLineParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--size", default=None, help="model size (default: small on cuda, tiny on cpu)")
    add_model_config_arg(ap)
    ap.add_argument("--dtype", default=None, choices=list(DTYPES), help="default: bf16 on cuda, fp32 on cpu")
    ap.add_argument("--lengths", default="17,1,4,1,300,17",
                    help="prompt bytes of each call, in order (comma-separated)")
    ap.add_argument("--new_bytes", type=int, default=256, help="bytes generated per call")
    ap.add_argument("--compile", choices=["on", "off"], default=None, help="default: on for cuda, off for cpu")
    ap.add_argument("--session", action="store_true",
                    help="pass one DecodeSession to every call: later calls of the same settings run on the kept "
                         "decoder and graphs (setup and first run without building, warming up or capturing)")
    ap.add_argument("--out", default=".")
    return ap


@cli_entry
def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise UserError("no CUDA device here; use --device cpu (eager, tiny) or run on a GPU machine")
    check_ranges(args, {"new_bytes": 1})
    lengths = int_list("lengths", args.lengths)
    ready_out_dir(args.out)
    size = args.size or ("small" if cuda else "tiny")
    dtype = DTYPES[args.dtype or ("bf16" if cuda else "fp32")]
    compiled = (args.compile or ("on" if cuda else "off")) == "on"
    torch.manual_seed(0)
    model = build_model(model_config_from(args.model_config)) if args.model_config else create_model(size)
    model = model.to(args.device, dtype).eval()
    rows, session = [], DecodeSession() if args.session else None
    for n in lengths:
        t = time.perf_counter()
        out, info = generate(model, prompt(n), args.new_bytes, greedy=True, compile=compiled, return_info=True,
                             session=session)
        if cuda:
            torch.cuda.synchronize()
        d = info["decode"]
        rows.append({"prompt_bytes": n, "new_bytes": len(out), "wall_s": round(time.perf_counter() - t, 4),
                     "reused": bool(session and session.reuses > sum(r["reused"] for r in rows)),
                     **{k: round(d[k], 4) if isinstance(d[k], float) else d[k]
                        for k in ("setup_s", "first_run_steps", "first_run_s", "rest_steps", "rest_s", "steps",
                                  "cuda_graphs")}})
        print(json.dumps(rows[-1]), flush=True)
    result = {"command": "python3 benchmarks/time_generate_calls.py " + " ".join(argv), "device": device_name(args.device),
              "commit": git_commit(), "date": time.strftime("%Y-%m-%d", time.gmtime()), "torch": torch.__version__,
              "model": args.model_config or size, "dtype": str(dtype).removeprefix("torch."), "compile": compiled,
              "session": args.session,
              "calls": rows}
    atomic_write(f"{args.out}/generate_calls.json", json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
