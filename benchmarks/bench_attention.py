"""Dilated attention, forward + backward: the Triton kernel vs SDPA dense causal (FlashAttention) vs
FlexAttention with a dilated mask_mod vs the gather reference. Needs a CUDA GPU.

    PYTHONPATH=. python benchmarks/bench_attention.py --out out/attention.json [--sweep] [--check] [--graph_timing]

Per N: median time (triton.testing.do_bench), peak extra memory of one fwd+bwd, and bandwidth against
the memory floor: the bytes any fwd+bwd pair must move (forward reads q, k, v and writes o and lse;
backward reads q, k, v, o, dO and lse and writes dq, dk, dv), over the measured device copy bandwidth.
Prints a Markdown table last and writes everything as JSON to --out (rewritten after every row, so a
run cut short keeps what it measured).
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._checks import KernelRoute, check_flags, int_list  # noqa: E402
from ionllama.errors import OneLineParser, UserError, cli_entry  # noqa: E402
from ionllama.eval.benchmark import device_name  # noqa: E402
from ionllama.fsutil import atomic_write, ready_out_file  # noqa: E402
from ionllama.kernels import dilated_attention  # noqa: E402
from ionllama.kernels import dilated_attention_triton as dat  # noqa: E402
from ionllama.model.dilated_attention import dilated_attention_reference, dilated_offsets  # noqa: E402


DEVICE = "cuda"  # --device cpu: a dry run of the script itself (tiny sizes, TRITON_INTERPRET=1)
GRAPH_TIMING = False  # --graph_timing: each method is also timed replayed from a CUDA graph (do_bench_graph)


def do_bench(fn, rep=100, warmup=25, grad_to_none=None):
    if DEVICE != "cuda":  # dry run: wall clock, a few calls
        ts = []
        for _ in range(3):
            for t in grad_to_none or []:
                t.grad = None
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
        return sorted(ts)[1]
    import triton.testing
    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none, return_mode="median")


def do_bench_graph(fn, rep=100, grad_to_none=None, replays=10):
    """Median ms per call of fn replayed from one CUDA graph that holds n calls (n sized to ~rep ms). Why: at small
    sizes do_bench's time is host time (Python, autograd's backward thread, one launch per kernel: kernels.md's
    1K row was ~26 us of kernels in 0.36-0.73 ms), so it ranks the callers' overhead, not the kernels. A graph
    replay has none of it, the way the kernels run inside the captured training step (--step_graph); every
    method gets the same treatment. Gradients are set to None before each call, so each backward writes fresh
    ones (no accumulation). On the CPU dry run: plain do_bench."""
    if DEVICE != "cuda":
        return do_bench(fn, rep=rep, grad_to_none=grad_to_none)

    def clear():
        for t in grad_to_none or []:
            t.grad = None

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture: autotuning, lazy initialisation, allocator
        for _ in range(3):
            clear()
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()

    def capture(n):
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(n):
                clear()
                fn()
        g.replay()  # the first replay uploads the graph; not timed
        torch.cuda.synchronize()
        return g

    def per_call(g, n):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / n

    g = capture(1)
    n = max(1, min(200, int(rep / max(per_call(g, 1), 1e-3))))
    del g
    g = capture(n)
    times = sorted(per_call(g, n) for _ in range(replays))
    del g
    clear()
    return times[len(times) // 2]


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth() -> float:
    """Device-to-device copy of 1 GiB, bytes read + written per second."""
    x = torch.empty(2 ** 28 if DEVICE == "cuda" else 2 ** 20, dtype=torch.float32, device=DEVICE).uniform_()
    y = torch.empty_like(x)
    ms = do_bench(lambda: y.copy_(x), rep=200)
    return 2 * x.numel() * 4 / (ms * 1e-3)


def profile_overhead(run, label, iters=30) -> dict:
    """Host-side cost of one call: wall time per call of a loop without syncs (CPU-bound at small sizes),
    the same with autograd's backward on the calling thread, and a cProfile of that loop."""
    import cProfile
    import io
    import pstats

    def loop(n):
        sync()
        t0 = time.perf_counter()
        for _ in range(n):
            run()
        sync()
        return (time.perf_counter() - t0) / n * 1e3

    run()
    out = {"label": label, "ms_per_call": loop(iters)}
    with torch.autograd.set_multithreading_enabled(False):
        out["ms_per_call_backward_on_caller_thread"] = loop(iters)
        pr = cProfile.Profile()
        pr.enable()
        loop(iters)
        pr.disable()
    buf = io.StringIO()
    pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(14)
    out["cprofile"] = buf.getvalue()[-5000:]
    print(f"[overhead] {label}: {out['ms_per_call']:.3f} ms/call, backward on caller thread "
          f"{out['ms_per_call_backward_on_caller_thread']:.3f} ms/call\n{out['cprofile']}", flush=True)
    return out


def profile_kernels(run, label, iters=5) -> dict:
    """Device time per kernel (torch.profiler), averaged over iters calls."""
    from torch.profiler import ProfilerActivity, profile
    if DEVICE != "cuda":
        return {"label": label, "kernels": []}
    run()
    sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            run()
        sync()
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None)
        if t is None:
            t = getattr(e, "cuda_time_total", 0)
        if t > 0:
            rows.append(dict(name=e.key[:90], calls=e.count, us_per_iter=t / iters))
    rows.sort(key=lambda r: -r["us_per_iter"])
    print(f"[kernels] {label}: " + "; ".join(f"{r['name'][:48]} {r['us_per_iter']:.1f} us" for r in rows[:10]),
          flush=True)
    return {"label": label, "kernels": rows[:20]}


def floor_bytes(B, H, N, Dh, elem=2) -> int:
    t = B * H * N * Dh * elem
    return 12 * t + 2 * 4 * B * H * N  # 4 tensors fwd + 8 bwd, lse written and read


def kernel_bytes(B, H, N, Dh, K, elem=2, store_ds=True) -> int:
    """Bytes our four kernels move if every row they touch through an offset comes from cache after its
    first read: fwd q,k,v,o + lse; delta o,dO; dkdv q,k,v,dO,dk,dv + lse, delta (+ ds); dq k,dq (+ ds)
    or q,k,v,dO,dq + lse, delta."""
    t = B * H * N * Dh * elem
    r = B * H * N * 4
    total = 4 * t + r + 2 * t + r + 6 * t + 2 * r
    if store_ds:
        total += 2 * K * r + 2 * t
    else:
        total += 5 * t + 2 * r
    return total


def peak_extra_memory(fn, tensors) -> int:
    if DEVICE != "cuda":
        return 0
    for t in tensors:
        t.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    for t in tensors:
        t.grad = None
    return peak


def dilated_mask_mod(local_width: int):
    def mask_mod(b, h, q_idx, kv_idx):
        d = q_idx - kv_idx
        return (d >= 0) & ((d < local_width) | ((d & (d - 1)) == 0))
    return mask_mod


def flex_rel_err(flex, xs, block_mask, N: int, local_width: int) -> float:
    """Flex's output against ours on the same inputs, both over --local-width's offsets (ours took the default
    width 3: at --local-width 5 a correct Flex read as a relative error of ~0.4)."""
    from ionllama.kernels.selfcheck import rel_err

    with torch.no_grad():
        q, k, v = (x.detach() for x in xs)
        return rel_err(flex(q, k, v, block_mask=block_mask),
                       dilated_attention(q, k, v, dilated_offsets(N, local_width)))


def make_inputs(B, H, N, Dh, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    q, k, v, do = (torch.randn(B, H, N, Dh, device=DEVICE, dtype=dtype, generator=g) for _ in range(4))
    return [t.requires_grad_() for t in (q, k, v)], do


def fwd_bwd(attn, xs, do):
    def run():
        out = attn(*xs)
        out.backward(do)
    return run


def measure(name, run, xs, n_bytes_floor, copy_bw, rep, graph=True):
    try:
        ms = do_bench(run, rep=rep, grad_to_none=xs)
        mem = peak_extra_memory(run, xs)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return dict(method=name, status="OOM")
    except Exception as e:  # a method that fails (compile error, unsupported size) is reported, not fatal
        return dict(method=name, status=f"error: {e!r}"[:300])
    floor_ms = n_bytes_floor / copy_bw * 1e3
    r = dict(method=name, status="ok", ms=ms, peak_mem_mb=mem / 2 ** 20,
             achieved_gbps=n_bytes_floor / (ms * 1e-3) / 1e9, floor_ms=floor_ms, x_floor=ms / floor_ms)
    if GRAPH_TIMING and graph:
        r.update(graph_timing(run, xs, rep, floor_ms))
    return r


def graph_timing(run, xs, rep, floor_ms=None) -> dict:
    """ms_graph (do_bench_graph) and its ratio to the floor; a method that cannot be captured (e.g. a host copy
    inside it) gets graph_status 'error: ...' and keeps its eager time."""
    try:
        ms = do_bench_graph(run, rep=rep, grad_to_none=xs)
    except Exception as e:  # capture failures are reported per method, not fatal
        if DEVICE == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        return dict(graph_status=f"error: {e!r}"[:300])
    out = dict(graph_status="ok", ms_graph=ms)
    if floor_ms:
        out["x_floor_graph"] = ms / floor_ms
    return out


def sweep(sizes, B, H, Dh, rep=30, local_width=3):
    """Greedy launch-config search: forward tiles, then dk/dv tiles, then dq tiles, then ds storage (over
    --local-width's offsets, those the rows time)."""
    tiles = [(bm, nw, pf) for pf in (False, True) for bm, nw in ((32, 2), (32, 4), (64, 4), (64, 8))]
    data = {}
    for N in sizes:
        xs, do = make_inputs(B, H, N, Dh, seed=1)
        offs = dat._prep_offsets(dilated_offsets(N, local_width), N, DEVICE)
        data[N] = (xs, do, offs)
    log = []
    default = dict(dat._CONFIG)

    def t_fwd():
        return sum(do_bench(lambda: dat.attention_forward(*data[N][0], data[N][2], None, Dh ** -0.5), rep=rep)
                   for N in sizes)

    def t_bwd():
        tot = 0.0
        for N in sizes:
            xs, do, offs = data[N]
            o, lse = dat.attention_forward(*[x.detach() for x in xs], offs, None, Dh ** -0.5)
            tot += do_bench(lambda: dat.attention_backward(do, *[x.detach() for x in xs], o, lse, offs, None,
                                                           Dh ** -0.5), rep=rep)
        return tot

    best = {}
    for key, timer in (("fwd", t_fwd), ("dkdv", t_bwd), ("dq", t_bwd)):
        results = []
        for tile in tiles:
            dat.set_attention_config(**{key: tile})
            try:
                ms = timer()
            except Exception as e:  # a tile that does not compile or fit is skipped, and logged
                log.append(dict(kernel=key, tile=tile, error=repr(e)[:200]))
                continue
            results.append((ms, tile))
            log.append(dict(kernel=key, tile=tile, ms_sum=ms, sizes=sizes))
            print(f"sweep {key} tile {tile}: {ms:.3f} ms (sum over N={sizes})", flush=True)
        best[key] = min(results)[1]
        dat.set_attention_config(**{key: best[key]})
    ms_ds = t_bwd()
    dat.set_attention_config(store_ds=False)
    ms_nods = t_bwd()
    log.append(dict(kernel="bwd", store_ds=True, ms_sum=ms_ds))
    log.append(dict(kernel="bwd", store_ds=False, ms_sum=ms_nods))
    print(f"sweep backward store_ds=True {ms_ds:.3f} ms, False {ms_nods:.3f} ms", flush=True)
    best["store_ds"] = ms_ds <= ms_nods
    dat.set_attention_config(**{k: v for k, v in default.items() if k not in best}, **best)
    return best, log


def prefetch_modes(text: str) -> list[int]:
    """--variants '0,1' -> [0, 1]; one line naming the first value that is not a prefetch setting (0, 1)."""
    out = []
    for item in (t for t in text.split(",") if t):
        if item not in ("0", "1"):
            raise UserError(f"--variants '{item}': a prefetch setting is 0 (none) or 1 (the next offset ahead)")
        out.append(int(item))
    return out


def git_commit() -> str:
    """The checkout's commit; BENCH_COMMIT overrides it (the GPU machine gets a copy without .git)."""
    import os
    if os.environ.get("BENCH_COMMIT"):
        return os.environ["BENCH_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parents[1]).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def run_info(argv) -> dict:
    """commit, the command as given and the UTC date, for a results file."""
    return dict(commit=git_commit(), argv=[sys.argv[0], *argv] if argv is not None else sys.argv,
                date=datetime.now(timezone.utc).isoformat(timespec="seconds"))


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(description="dilated attention fwd+bwd benchmark")
    p.add_argument("--out", required=True)
    p.add_argument("--sizes", default="1024,4096,16384,65536,131072")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--local-width", type=int, default=3)
    p.add_argument("--ref-max", type=int, default=65536, help="largest N for the gather reference")
    p.add_argument("--sdpa-max", type=int, default=131072)
    p.add_argument("--flex-sizes", default=None, help="N values for FlexAttention (default: all)")
    p.add_argument("--no-flex", action="store_true")
    p.add_argument("--check", action="store_true", help="run the correctness checks first")
    p.add_argument("--sweep", default=None, help="comma list of N for the launch-config sweep")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetition time (ms)")
    p.add_argument("--profile", default=None, help="comma list of N: host overhead and per-kernel device times")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="cpu: dry run of this script under TRITON_INTERPRET=1")
    p.add_argument("--variants", default="", help="comma list of prefetch settings (0: none, 1: the next offset's rows "
                   "loaded ahead) timed as extra methods triton_pfN beside the default config, in the same process")
    p.add_argument("--graph_timing", action="store_true",
                   help="also time every method replayed from a CUDA graph (no host overhead; second table)")
    return p


@cli_entry
def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    check_flags(a, {"batch": 1, "heads": 1, "head-dim": 1, "local-width": 1, "rep": 1}, a.device)
    if not 16 <= a.head_dim <= 128:  # the dispatcher sends other widths to the reference, timed as "triton"
        raise UserError(f"--head-dim {a.head_dim}: the Triton kernel takes head dims 16 to 128; pass one of those")
    int_list("sizes", a.sizes)
    variants = prefetch_modes(a.variants)
    for flag, text in (("flex-sizes", a.flex_sizes), ("sweep", a.sweep), ("profile", a.profile)):
        if text:
            int_list(flag, text, allow_empty=flag == "flex-sizes")
    out = ready_out_file(a.out)  # before any timing: a folder failed at the first save, after the checks
    global DEVICE, GRAPH_TIMING
    DEVICE, GRAPH_TIMING = a.device, a.graph_timing
    import triton
    torch.backends.cuda.matmul.allow_tf32 = False
    sizes = [int(s) for s in a.sizes.split(",")]
    flex_sizes = sizes if a.flex_sizes is None else [int(s) for s in a.flex_sizes.split(",") if s]
    B, H, Dh = a.batch, a.heads, a.head_dim
    res = dict(device=device_name(DEVICE) + ("" if DEVICE == "cuda" else " (dry run)"), torch=torch.__version__,
               triton=triton.__version__,
               python=platform.python_version(), **run_info(argv), B=B, H=H, Dh=Dh,
               dtype="bf16", rows=[], checks=None, sweep=None)

    def save():  # atomic: a run killed mid-write keeps the previous rows
        atomic_write(out, json.dumps(res, indent=1))

    res["copy_bw_gbps"] = copy_bandwidth() / 1e9
    print(f"{res['device']} torch {res['torch']} triton {res['triton']}; copy bandwidth "
          f"{res['copy_bw_gbps']:.0f} GB/s (read + write)", flush=True)
    copy_bw = res["copy_bw_gbps"] * 1e9
    if a.check:
        from ionllama.kernels.selfcheck import run as run_checks
        res["checks"] = run_checks(DEVICE, large=DEVICE == "cuda")
        save()
    if a.sweep:
        best, log = sweep([int(s) for s in a.sweep.split(",")], B, H, Dh, local_width=a.local_width)
        res["sweep"] = dict(best=best, log=log)
        print(f"sweep best: {best}", flush=True)
        save()
    res["config"] = {k: list(v) if isinstance(v, tuple) else v for k, v in dat._CONFIG.items()}
    if a.profile:
        res["profile"] = []
        for N in [int(x) for x in a.profile.split(",")]:
            xs, do = make_inputs(B, H, N, Dh)
            offsets = dilated_offsets(N, a.local_width)
            run = fwd_bwd(lambda q, k, v: dilated_attention(q, k, v, offsets), xs, do)
            with KernelRoute(DEVICE, dat, "attention_forward"):
                if N <= 4096:
                    res["profile"].append(profile_overhead(run, f"attention fwd+bwd N={N}"))
                res["profile"].append(profile_kernels(run, f"attention fwd+bwd N={N}"))
            del xs, do
        save()

    for N in sizes:
        offsets = dilated_offsets(N, a.local_width)
        xs, do = make_inputs(B, H, N, Dh)
        nb = floor_bytes(B, H, N, Dh)
        row = dict(N=N, K=len(offsets), floor_bytes=nb, floor_ms=nb / copy_bw * 1e3,
                   kernel_bytes=kernel_bytes(B, H, N, Dh, len(offsets), store_ds=dat._CONFIG["store_ds"]),
                   methods={})
        # correctness of this very run (bf16 vs the fp32 reference on the same inputs), where it fits
        with KernelRoute(DEVICE, dat, "attention_forward") as route:
            if N <= 16384:
                from ionllama.kernels.selfcheck import rel_err
                out_k = dilated_attention(*xs, offsets)
                ref = dilated_attention_reference(*[x.detach().float() for x in xs], offsets)
                row["rel_err_out_vs_reference"] = rel_err(out_k, ref)
                del out_k, ref
            row["methods"]["triton"] = measure("triton", fwd_bwd(lambda q, k, v: dilated_attention(q, k, v, offsets),
                                                                  xs, do), xs, nb, copy_bw, a.rep)
        row["methods"]["triton"] = route.check(row["methods"]["triton"])
        for pf in variants:  # the same kernels with another prefetch setting for all three loops, in this process
            old_cfg = dat.set_attention_config(**{k: tuple(dat._CONFIG[k][:2]) + (bool(pf),)
                                                  for k in ("fwd", "dkdv", "dq")})
            try:
                with KernelRoute(DEVICE, dat, "attention_forward") as route:
                    r = measure(f"triton_pf{pf}", fwd_bwd(lambda q, k, v: dilated_attention(q, k, v, offsets), xs, do),
                                xs, nb, copy_bw, a.rep)
                row["methods"][f"triton_pf{pf}"] = route.check(r)
            finally:
                dat.set_attention_config(**old_cfg)
        if N <= a.sdpa_max:
            row["methods"]["sdpa"] = measure(
                "sdpa", fwd_bwd(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), xs, do),
                xs, nb, copy_bw, a.rep)
        if N <= a.ref_max:
            # not graph-timed: the oracle, not a contender, and it copies its offsets from a host list per call
            # (a pageable copy, which a stream capture refuses; a failed capture is best not risked before Flex)
            row["methods"]["reference"] = measure(
                "reference", fwd_bwd(lambda q, k, v: dilated_attention_reference(q, k, v, offsets), xs, do),
                xs, nb, copy_bw, a.rep, graph=False)
        res["rows"].append(row)
        save()
        print(f"N={N}: " + ", ".join(f"{m} {r.get('ms', float('nan')):.3f} ms" for m, r in row["methods"].items()),
              flush=True)
        del xs, do
        if DEVICE == "cuda":
            torch.cuda.empty_cache()

    if not a.no_flex and DEVICE == "cuda":  # last: its compilation is slow, and a cut-short run keeps the rows above
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        flex = torch.compile(flex_attention, dynamic=False)
        for row in res["rows"]:
            N = row["N"]
            if N not in flex_sizes:
                continue
            xs, do = make_inputs(B, H, N, Dh)
            t0 = time.perf_counter()
            try:
                bm = create_block_mask(dilated_mask_mod(a.local_width), None, None, N, N, device="cuda",
                                       _compile=True)
                fn = fwd_bwd(lambda q, k, v: flex(q, k, v, block_mask=bm), xs, do)
                fn()
                sync()
                compile_s = time.perf_counter() - t0
                # same function as ours? (on these inputs, bf16)
                ref_small = flex_rel_err(flex, xs, bm, N, a.local_width) if N <= 16384 else None
                r = measure("flex", fn, xs, row["floor_bytes"], copy_bw, a.rep)
                r["compile_s"] = compile_s
                r["rel_err_vs_triton"] = ref_small
            except torch.OutOfMemoryError:
                r = dict(method="flex", status="OOM")
            row["methods"]["flex"] = r
            save()
            print(f"N={N}: flex {r.get('ms', float('nan')):.3f} ms (compile {r.get('compile_s', 0):.1f} s)",
                  flush=True)
            del xs, do
            torch.cuda.empty_cache()

    save()
    print_table(res)
    return 0 if (res["checks"] is None or all(c["ok"] for c in res["checks"])) else 1


def fmt_ms(r):
    if r is None:
        return "-"
    if r.get("status") != "ok":
        return r.get("status", "-")
    return f"{r['ms']:.3f}"


def print_table(res):
    if res.get("checks"):
        bad = [c for c in res["checks"] if not c["ok"]]
        print(f"\ncorrectness: {len(res['checks']) - len(bad)}/{len(res['checks'])} checks pass "
              f"(worst bf16 {max((max(c['errors'].values()) for c in res['checks'] if c['dtype'] == 'bf16'), default=0):.2e}, "
              f"worst fp32 {max((max(c['errors'].values()) for c in res['checks'] if c['dtype'] == 'fp32'), default=0):.2e})")
    print(f"\n{res['device']}, B={res['B']}, {res['H']} heads x {res['Dh']}, bf16, fwd+bwd, median ms; "
          f"copy bw {res['copy_bw_gbps']:.0f} GB/s; config {res.get('config')}")
    print("| N | K | ours | SDPA dense | Flex dilated | reference | floor | ours / floor | ours GB/s (floor bytes) "
          "| SDPA / ours | Flex / ours | ours peak MB | SDPA peak MB | Flex peak MB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in res["rows"]:
        m = row["methods"]
        t = m.get("triton")
        ok = t is not None and t.get("status") == "ok"

        def ratio(name):
            o = m.get(name)
            return f"{o['ms'] / t['ms']:.1f}x" if ok and o and o.get("status") == "ok" else "-"

        def mem(name):
            o = m.get(name)
            return f"{o['peak_mem_mb']:.0f}" if o and o.get("status") == "ok" else "-"
        print(f"| {row['N']} | {row['K']} | {fmt_ms(t)} | {fmt_ms(m.get('sdpa'))} | {fmt_ms(m.get('flex'))} | "
              f"{fmt_ms(m.get('reference'))} | {row['floor_ms']:.3f} | {t['x_floor'] if ok else float('nan'):.2f} | "
              f"{t['achieved_gbps'] if ok else float('nan'):.0f} | {ratio('sdpa')} | {ratio('flex')} | {mem('triton')} | "
              f"{mem('sdpa')} | {mem('flex')} |")
    if any("graph_status" in r for row in res["rows"] for r in row["methods"].values()):
        print_graph_table(res)


def print_graph_table(res):
    """The same rows timed from CUDA graph replays (--graph_timing)."""
    def g(r):
        if r is None or "graph_status" not in r:
            return "-"
        return f"{r['ms_graph']:.3f}" if r["graph_status"] == "ok" else r["graph_status"][:40]

    print("\nreplayed from a CUDA graph (do_bench_graph), median ms per fwd+bwd:")
    print("| N | K | ours | SDPA dense | Flex dilated | reference | floor | ours / floor | SDPA / ours | Flex / ours |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in res["rows"]:
        m = row["methods"]
        t = m.get("triton") or {}
        ok = t.get("graph_status") == "ok"

        def ratio(name):
            o = m.get(name) or {}
            return f"{o['ms_graph'] / t['ms_graph']:.1f}x" if ok and o.get("graph_status") == "ok" else "-"
        print(f"| {row['N']} | {row['K']} | {g(m.get('triton'))} | {g(m.get('sdpa'))} | {g(m.get('flex'))} | "
              f"{g(m.get('reference'))} | {row['floor_ms']:.3f} | {t['x_floor_graph'] if ok else float('nan'):.2f} | "
              f"{ratio('sdpa')} | {ratio('flex')} |")


if __name__ == "__main__":
    sys.exit(main())
