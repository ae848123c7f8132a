"""End-to-end training throughput: ionLlama vs the dense byte transformer, same script, same GPU, same run.

Measures optimizer steps (forward + backward + fused AdamW, bf16 autocast) on random or real bytes at
a given sequence length and reports bytes/s, MFU (model FLOPs per byte from ionllama.model.flops, plus a Mamba
arm's chunked scan as ionllama.experiment.flops counts it, times bytes/s over the GPU's peak bf16 rate) and peak
memory.

    PYTHONPATH=. python benchmarks/bench_train_throughput.py --sizes tiny small --seq_len 8192 \
        --batch_size 8 --compile --out $OUT/train_throughput.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import sys
import time
from datetime import datetime, timezone
from types import SimpleNamespace

import torch

from ionllama import create_model
from ionllama.errors import UserError, check_ranges, cli_entry
from ionllama.eval.benchmark import device_name, git_commit
from ionllama.experiment.flops import train_flops_per_byte
from ionllama.fsutil import atomic_write, ready_out_file
from ionllama.registry import model_config
from ionllama.train.optim import make_adamw
from ionllama.train.step_graph import make_step_graph, step_graph_problem

# dense bf16 datasheet rates (half the "with sparsity" figure); the first key in the device's name wins, so the PCIe
# card (114 SMs, lower clocks) comes before the SXM parts, whose names carry no form factor ("NVIDIA H100 80GB HBM3")
PEAK_BF16 = {"H100 PCIe": 756.5e12, "H100": 989.4e12, "H200": 989.4e12}
PEAK_UNKNOWN = ("NVL",)  # H100 NVL / H200 NVL: other rates than the SXM part they are named after; MFU left out
REFERENCE_SWITCHES = {"conv_gate": "conv_gate_uses_triton", "rope_table": "rope_table_uses_op",  # --reference
                      "ssd_scan": "ssd_uses_triton"}


def peak_flops(device: str | None = None) -> float:
    """The datasheet bf16 rate of --device; NaN where unknown (the CPU, other GPUs)."""
    name = device_name(device)
    if any(k in name for k in PEAK_UNKNOWN):
        return float("nan")
    for key, val in PEAK_BF16.items():
        if key in name:
            return val
    return float("nan")


def read_text(path: str, seq_len: int) -> bytes:
    """--text_path's bytes, checked before any arm compiles: a window must fit (sample_batch would otherwise fall
    back to random bytes without a word)."""
    try:
        text = open(path, "rb").read()
    except OSError as e:
        raise UserError(f"--text_path {path}: cannot read it ({e.strerror}); give a file of raw text bytes") from None
    if len(text) < seq_len + 2:
        raise UserError(f"--text_path {path}: {len(text):,} bytes, too few for one {seq_len}-byte window; "
                        f"give a file of at least {seq_len + 2:,} bytes or a smaller --seq_len")
    return text


def sample_batch(text: bytes | None, B: int, T: int, gen: torch.Generator) -> torch.Tensor:
    if text is None or len(text) < T + 2:
        return torch.randint(0, 256, (B, T + 1), generator=gen)
    data = torch.frombuffer(bytearray(text), dtype=torch.uint8)
    starts = torch.randint(0, len(data) - T - 1, (B,), generator=gen)
    return torch.stack([data[s:s + T + 1] for s in starts.tolist()]).long()


def our_kernel_names() -> set[str]:
    """The names of the @triton.jit kernels in ionllama/kernels (as the profiler shows them: '_conv_gate_fwd',
    '_ssd_fwd', ...); empty where Triton is not installed."""
    import importlib
    import pkgutil

    try:
        import triton

        import ionllama.kernels as pkg
    except ImportError:
        return set()
    names = set()
    for mod in pkgutil.iter_modules(pkg.__path__):
        try:
            m = importlib.import_module(f"ionllama.kernels.{mod.name}")
        except ImportError:
            continue
        names |= {k for k, v in vars(m).items() if isinstance(v, triton.runtime.JITFunction)}
    return names


_OURS = our_kernel_names()
KERNEL_GROUPS = [  # kernel-name patterns -> a coarse category, to see where a step's GPU time goes
    ("matmul", re.compile(r"gemm|nvjet|cutlass|sm90_xmma|ampere_|cublas", re.I)),
    ("sdpa/flash", re.compile(r"flash|fmha|attention", re.I)),
    ("ours (ionllama/kernels, Triton)",
     re.compile("^(" + "|".join(sorted(map(re.escape, _OURS))) + ")$") if _OURS else re.compile(r"(?!x)x")),
    ("inductor (triton_*)", re.compile(r"triton", re.I)),
    ("copy/cast", re.compile(r"copy|memcpy|memset|cast|convert", re.I)),
]


def profile_steps(step, tag: str, out_dir: str, n: int = 3) -> None:
    """torch.profiler over n steps: the top kernels by GPU time, a coarse breakdown, and graph breaks."""
    import collections

    from torch._dynamo.utils import counters
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        for i in range(n):
            step(i)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    # kernel rows only: operator rows carry their kernels' time too, and would count it twice
    dev_events = [e for e in prof.key_averages() if e.device_type.name == "CUDA" and e.self_device_time_total > 0]
    total = sum(e.self_device_time_total for e in dev_events) or 1.0
    groups = collections.Counter()
    for e in dev_events:
        cat = next((c for c, rx in KERNEL_GROUPS if rx.search(e.key)), "other")
        groups[cat] += e.self_device_time_total
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"profile_{tag}.txt"), "w") as f:
        f.write(f"{n} steps; GPU kernel time {total / 1e3 / n:.2f} ms/step; kernels launched/step "
                f"{sum(e.count for e in dev_events) / n:.0f}\n")
        f.write(f"dynamo graph breaks (whole process): {dict(counters['graph_break'])}\n")
        for cat, t in groups.most_common():
            f.write(f"  {cat:28s} {t / total:6.1%}  {t / 1e3 / n:8.2f} ms/step\n")
        f.write(prof.key_averages().table(sort_by="self_device_time_total" if dev_events else "self_cpu_time_total",
                                          row_limit=40, max_name_column_width=90))


def sdpa_backend(name: str):
    """Pin SDPA's backend (the dense arm's attention) or leave torch's choice ("auto")."""
    import contextlib

    from torch.nn.attention import SDPBackend, sdpa_kernel
    if name == "auto":
        return contextlib.nullcontext()
    return sdpa_kernel({"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                        "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[name])


def bench_one(name: str, model_kind: str, size: str, args, text: bytes | None, overrides: dict) -> dict:
    dev = torch.device(args.device)
    torch.manual_seed(0)
    model = create_model(size, model=model_kind, **overrides).to(dev)
    gen = torch.Generator().manual_seed(0)
    bpp = 1.0
    if getattr(model, "needs_entropy_phase", False):
        calib = sample_batch(text, 8, min(args.seq_len, 4096), gen).to(dev)
        bpp = model.calibrate_threshold(calib)["bytes_per_patch"]
        model.freeze_entropy(True)
    fwd = model
    if args.compile and args.compile_mode == "parts" and hasattr(model, "compile_parts"):
        model.compile_parts()  # each layer its own graph (the numbers in train_throughput.md)
    elif args.compile:  # the whole forward, as the trainer does (graph breaks where it must); reduce-overhead
        # also replays each compiled graph (one per padded patch count) as a CUDA graph: no per-kernel launches
        fwd = torch.compile(model, mode="reduce-overhead" if args.compile_mode == "reduce-overhead" else None)
        import torch._inductor.config as inductor_config

        if args.compile_mode == "reduce-overhead" and hasattr(inductor_config.triton,
                                                             "cudagraph_trees_history_recording"):
            # ionLlama's replay fails with "tensor(s) in the cudagraph pool not tracked as outputs": with
            # this, the error names the allocation's stack (slower warm-up; the timed steps are replays)
            inductor_config.triton.cudagraph_trees_history_recording = True
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_warm = args.warmup
    if args.step_graph and dev.type == "cuda":
        why = step_graph_problem(model, SimpleNamespace(grad_accum=1, seq_len=args.seq_len, compile_mode=args.compile_mode),
                                 dev, 1, torch.bfloat16)
        if why:
            return {"arm": name, "size": size, "error": why}
    if args.step_graph:  # the trainer's --step_graph: the whole step (fwd, bwd, AdamW) replayed as one CUDA graph
        opt = make_adamw(model, trainable, 1e-4, 0.0, dev, capturable=True)
        # entropy/space patching: the two-stage step (boundaries eagerly, a graph per latent-length bucket)
        graphed = make_step_graph(model, fwd, opt, 0.0, lambda: torch.autocast(dev.type, dtype=torch.bfloat16,
                                                                              enabled=dev.type == "cuda"),
                                  args.seq_len, warmup=args.warmup, graphs=dev.type == "cuda",
                                  compile_stage_a=args.stage_a == "compiled")
        graphed.graph_stage_a = args.stage_a != "eager"
        n_warm += 1  # the next call records the graph: keep it out of the timed steps
        if graphed.boundaries is not None:  # each of the 4 batches may have its own bucket, warmed up and recorded
            n_warm *= 4
    else:
        opt = torch.optim.AdamW(trainable, lr=1e-4, fused=dev.type == "cuda")
    amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")
    batches = [sample_batch(text, args.batch_size, args.seq_len, gen).to(dev) for _ in range(4)]
    # whole rounds over the batches the timed steps cycle through: a batch's first step may compile or record a graph
    # for its own padded patch count (entropy patching), and with --warmup below 4 that landed in the timed steps
    n_warm = -(-n_warm // len(batches)) * len(batches)

    def step(i):
        x = batches[i % len(batches)]
        if args.step_graph:
            return graphed(x[:, :-1], x[:, 1:], 1e-4)
        if args.compile and args.compile_mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's graph outputs may be overwritten
        with amp, sdpa_backend(args.sdpa_backend):
            out = fwd(x[:, :-1], x[:, 1:])
        out["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(n_warm):
        out = step(i)
    measured_bpp = (args.batch_size * args.seq_len) / (out["patches"] if args.step_graph else
                                                        out["n_patches"].sum()).item()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(args.steps):
        step(i)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / args.steps
    if args.profile:
        profile_steps(step, f"{name}_{size}".replace(":", "_").replace("=", "-").replace(",", "_"), args.profile)
    bytes_per_s = args.batch_size * args.seq_len / dt
    fpb = train_flops_per_byte(model, "main", args.seq_len, measured_bpp, None)  # the experiments' count: a Mamba
    # arm's chunked scan too (ionllama.model.flops alone left it out, ~11 % of mamba-small's FLOPs at seq 8192)
    return {"arm": name, "model": model_kind, "size": size, "overrides": overrides,
            "params_M": round(model.count_parameters()["total"] / 1e6, 2), "seq_len": args.seq_len,
            "batch_size": args.batch_size, "compile": args.compile and args.compile_mode, "sdpa_backend": args.sdpa_backend,
            "step_graph": args.step_graph, "stage_a": args.stage_a if args.step_graph else None,
            "reference_paths": args.reference, "warmup_steps": n_warm, "step_ms": round(dt * 1e3, 2),
            "bytes_per_s": round(bytes_per_s), "bytes_per_patch": round(measured_bpp, 3),
            "calibrated_bytes_per_patch": round(bpp, 3), "flops_per_byte": fpb,
            "mfu": _finite(round(fpb * bytes_per_s / peak_flops(args.device), 4)),
            "peak_mem_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 2) if dev.type == "cuda" else None}


def _cell(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["tiny", "small"])
    p.add_argument("--arms", nargs="+", default=["ionllama", "dense"],
                   help="ionllama, dense, or ionllama:key=val,key=val for ablations")
    p.add_argument("--seq_len", type=int, default=8192)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3,
                   help="untimed steps first, rounded up to whole rounds over the 4 batches the timed steps use")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--compile_mode", choices=["parts", "whole", "reduce-overhead"], default=None,
                   help="with --compile: parts (default): model.compile_parts() (per layer); whole: "
                        "torch.compile(model), as the trainer; reduce-overhead: whole, with CUDA graphs")
    p.add_argument("--step_graph", action="store_true",
                   help="capture the whole step as one CUDA graph (ionllama/train/step_graph.py); with --compile, "
                        "use --compile_mode whole")
    p.add_argument("--stage_a", choices=["auto", "graph", "eager", "compiled"], default="auto",
                   help="with --step_graph, entropy / space patching: stage A (the boundaries) as its own CUDA graph, "
                        "eager (as before the eleventh session), or torch.compile'd and then captured "
                        "(make_step_graph's compile_stage_a); auto = the trainer's way: compiled with --compile, "
                        "else graph")
    p.add_argument("--text_path", default=None, help="raw bytes to sample from (else random bytes)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None)
    p.add_argument("--sdpa_backend", default="auto", choices=["auto", "flash", "cudnn", "efficient", "math"])
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="after timing, profile 3 steps per arm; top kernels and a breakdown to DIR/profile_*.txt")
    p.add_argument("--reference", nargs="*", default=[], choices=sorted(REFERENCE_SWITCHES),
                   help="route these through their plain PyTorch path even on CUDA (as before their fast path), "
                        "for an A/B against the default: conv_gate (IntegralLNN's conv + gate Triton op), "
                        "rope_table (the latent stack's shared RoPE table op), ssd_scan (the frozen entropy model's "
                        "forward-only Mamba-2 scan kernel)")
    return p


def _finite(v: float) -> float | None:
    """None for NaN / inf: json.dump writes them as NaN / Infinity, which strict JSON readers refuse."""
    return v if math.isfinite(v) else None


def check_out(path: str | None) -> None:
    """--out before any arm runs: a folder or an unwritable place failed only after minutes of benchmarking."""
    if path:
        ready_out_file(path)


def _typed(v: str):
    for cast in (int, float):  # dropout=0.1 must reach the model as a float, n_layers=8 as an int
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def parse_arm(arm: str) -> tuple[str, dict]:
    """'ionllama:attention=dense,dropout=0.1' -> ('ionllama', {'attention': 'dense', 'dropout': 0.1})."""
    kind, _, opts = arm.partition(":")
    overrides = {}
    for kv in filter(None, opts.split(",")):
        k, eq, v = kv.partition("=")
        if not eq:
            raise UserError(f"--arms: '{kv}' in '{arm}' is not key=value; e.g. ionllama:attention=dense")
        overrides[k] = _typed(v)
    return kind, overrides


@cli_entry
def main(argv=None):
    args = build_parser().parse_args(argv)
    command = "python3 benchmarks/bench_train_throughput.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    # one warm-up step at least: its output gives the measured bytes per patch (bench_one warms up every batch)
    check_ranges(args, {"seq_len": 2, "batch_size": 1, "steps": 1, "warmup": 1})
    if args.compile_mode is not None and not args.compile:  # it was silently ignored: the rows ran eager
        raise UserError(f"--compile_mode {args.compile_mode} applies to compiled steps only; add --compile")
    args.compile_mode = args.compile_mode or "parts"
    from ionllama.train.trainer import resolve_device

    resolve_device(args.device)  # --device cuda without a GPU: one line, not a traceback from the first CUDA call
    arms = [(arm, *parse_arm(arm)) for arm in args.arms]
    for size in args.sizes:  # every arm checked (model, size, options) before minutes of compiling the first
        for arm, kind, overrides in arms:
            if model_config(size, kind, **overrides).model == "bpe":  # its rows were tokens/s under "bytes/s"
                raise UserError(f"--arms {arm}: a BPE model's steps hold tokens, and this benchmark counts bytes "
                                "(random bytes, no tokenizer); compare byte-level models (ionllama, dense, mamba)")
    if args.stage_a == "auto":  # the trainer's --compile_stage_a auto
        args.stage_a = "compiled" if args.compile else "graph"
    import ionllama.kernels as K
    for name in args.reference:  # before any model is traced: the dispatchers read these at trace time
        setattr(K, REFERENCE_SWITCHES[name], lambda *a: False)
    text = read_text(args.text_path, args.seq_len) if args.text_path else None
    check_out(args.out)  # last of the checks: it may make --out's folder
    rows = []
    for size in args.sizes:
        for arm, kind, overrides in arms:
            try:
                r = bench_one(arm, kind, size, args, text, overrides)
            except torch.cuda.OutOfMemoryError as e:  # report, keep going
                r = {"arm": arm, "size": size, "error": f"OOM: {str(e)[:80]}"}
                torch.cuda.empty_cache()
            rows.append(r)
            print(json.dumps(r), flush=True)
    meta = {"command": command, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "commit": git_commit(), "device": device_name(args.device), "torch": torch.__version__,
            "peak_bf16_flops": _finite(peak_flops(args.device)), "rows": rows}
    if args.out:
        atomic_write(args.out, json.dumps(meta, indent=1, allow_nan=False))
    print("\n| arm | size | params (M) | seq | batch | step ms | bytes/s | bytes/patch | MFLOP/byte | MFU | peak GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['arm']} | {r['size']} | {r['error']} |")
            continue
        print(f"| {r['arm']} | {r['size']} | {r['params_M']} | {r['seq_len']} | {r['batch_size']} | {r['step_ms']} | "
              f"{r['bytes_per_s']:,} | {r['bytes_per_patch']} | {r['flops_per_byte'] / 1e6:.1f} | {_cell(r['mfu'])} | "
              f"{r['peak_mem_GiB']} |")


if __name__ == "__main__":
    main()
