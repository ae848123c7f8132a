"""Where does a `generate()` call's time go, call after call in one process? (issue #4)

The fiftieth session saw a 1-byte prompt's first `generate()` take ~4 s on CUDA although its first decode run took
0.045 s: the time went before the decode loop, after other prompt lengths had already run. This script calls
`generate()` once per prompt length in --lengths, in that order, in one process (random weights, real text
prompts), and keeps each call's `return_info["decode"]` timings: setup_s (decoder, prefill, runner: where a new
prompt length's Triton compiles or autotunes would show), first_run_s (compiling, capturing) and rest_s, plus the
whole call's wall time, and `new_kernel_variants`: which of ionllama's own Triton kernels took on a new
specialization during the call, compiled or loaded from Triton's disk cache (Triton specializes an int argument
equal to 1, or divisible by 16). Each
of --arms runs all lengths in one process: the pipelined read-back on or off, unroll (fixed patching's span
graphs), one DecodeSession for the arm's calls or none; the JSON's summary gives each arm's median wall time after
its first call and median steady rate (bytes read after the first run / its seconds).

    C=docs/results/phase1-dropout/ionllama_fixed/config.json
    PYTHONPATH=. python3 benchmarks/time_generate_calls.py --model_config $C \
        --lengths 17,1,4,1,300,17 --arms pipe=1 pipe=0 pipe=1,session=1 pipe=1,unroll=16 --out $OUT/calls

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


ARM_KEYS = {"pipe": (0, 1), "unroll": None, "session": (0, 1)}  # None: any whole number >= 1


def parse_arm(text: str) -> dict:
    """'pipe=0,unroll=16,session=1' -> {'pipe': 0, 'unroll': 16, 'session': 1} over the defaults; else one line."""
    arm = {"pipe": 1, "unroll": 1, "session": 0}
    for part in filter(None, text.split(",")):
        key, _, val = part.partition("=")
        ok = key in ARM_KEYS and val.isdigit() and (ARM_KEYS[key] is None and int(val) >= 1 or
                                                     ARM_KEYS[key] is not None and int(val) in ARM_KEYS[key])
        if not ok:
            raise UserError(f"--arms '{text}': give comma-separated pipe=0|1, unroll=N (N >= 1), session=0|1")
        arm[key] = int(val)
    return arm


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
    ap.add_argument("--arms", nargs="+", default=["pipe=1"],
                    help="settings, each running every length in turn, in this order, in one process: pipe=0|1 "
                         "(queue the next run before reading one back: generate's default on CUDA), unroll=N "
                         "(bytes per graph launch: fixed patching's span graphs), session=0|1 (one DecodeSession "
                         "for the arm's calls: later calls run on the kept decoder and graphs)")
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
    arms = [parse_arm(a) for a in args.arms]
    ready_out_dir(args.out)
    size = args.size or ("small" if cuda else "tiny")
    dtype = DTYPES[args.dtype or ("bf16" if cuda else "fp32")]
    compiled = (args.compile or ("on" if cuda else "off")) == "on"
    torch.manual_seed(0)
    model = build_model(model_config_from(args.model_config)) if args.model_config else create_model(size)
    model = model.to(args.device, dtype).eval()
    with torch.no_grad():  # greedy never picks the end-of-document byte (logit 0 against 255 random ones)
        model.head.weight[0].zero_()
    gen = sys.modules["ionllama.generation.generate"]
    pipelined = gen._pipelined
    rows, summary = [], []
    try:
        for i, arm in enumerate(arms):
            gen._pipelined = pipelined if arm["pipe"] else (lambda device: False)
            session = DecodeSession() if arm["session"] else None
            arm_rows = []
            for n in lengths:
                reuses = session.reuses if session else 0
                variants = kernel_variants()
                t = time.perf_counter()
                out, info = generate(model, prompt(n), args.new_bytes, greedy=True, compile=compiled,
                                     return_info=True, session=session, unroll=arm["unroll"])
                if cuda:
                    torch.cuda.synchronize()
                wall = time.perf_counter() - t
                d = info["decode"]
                arm_rows.append({"arm": i, **arm, "prompt_bytes": n, "new_bytes": len(out),
                                 "wall_s": round(wall, 4),
                                 "reused": bool(session and session.reuses > reuses),
                                 **{k: round(d[k], 4) if isinstance(d[k], float) else d[k]
                                    for k in ("setup_s", "first_run_steps", "first_run_s", "rest_steps", "rest_s",
                                              "steps", "cuda_graphs")},
                                 "new_kernel_variants": new_variants(variants, kernel_variants())})
                print(json.dumps(arm_rows[-1]), flush=True)
            rows += arm_rows
            later = arm_rows[1:] or arm_rows
            summary.append({"arm": i, **arm, "median_wall_s_after_first": median(r["wall_s"] for r in later),
                            "median_steady_bytes_per_s": median(r["rest_steps"] / r["rest_s"] for r in arm_rows
                                                                if r["rest_s"] > 0 and r["rest_steps"] > 0)})
            print(json.dumps(summary[-1]), flush=True)
    finally:
        gen._pipelined = pipelined
    result = {"command": "python3 benchmarks/time_generate_calls.py " + " ".join(argv),
              "device": device_name(args.device),
              "commit": git_commit(), "date": time.strftime("%Y-%m-%d", time.gmtime()), "torch": torch.__version__,
              "model": args.model_config or size, "dtype": str(dtype).removeprefix("torch."), "compile": compiled,
              "summary": summary, "calls": rows}
    atomic_write(f"{args.out}/generate_calls.json", json.dumps(result, indent=1))
    return result


def kernel_variants() -> dict[str, int]:
    """{module.kernel: compiled variants held} for every Triton kernel of ionllama.kernels that has compiled one.
    Autotuner / heuristics wrappers are unwrapped to their JITFunction (.fn)."""
    import importlib
    import pkgutil

    import ionllama.kernels as pkg
    try:
        from triton.runtime.jit import JITFunction
    except ImportError:
        return {}
    counts, seen = {}, set()
    for info in pkgutil.iter_modules(pkg.__path__):
        try:
            mod = importlib.import_module(f"{pkg.__name__}.{info.name}")
        except ImportError:
            continue
        for obj in vars(mod).values():
            for _ in range(8):  # autotune -> heuristics -> JITFunction; bounded, whatever .fn holds
                if obj is None or isinstance(obj, JITFunction):
                    break
                obj = getattr(obj, "fn", None)
            if not isinstance(obj, JITFunction) or id(obj) in seen:  # a kernel imported by two modules counts once
                continue
            seen.add(id(obj))
            n = sum(len(c[0] if isinstance(c, tuple) else c) for c in getattr(obj, "device_caches", {}).values())
            if n:
                counts[f"{obj.fn.__module__.rsplit('.', 1)[-1]}.{obj.fn.__qualname__}"] = n
    return counts


def new_variants(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: n - before.get(k, 0) for k, n in after.items() if n > before.get(k, 0)}


def median(values) -> float | None:
    v = sorted(values)
    return round(v[len(v) // 2], 4) if v else None


if __name__ == "__main__":
    main()
