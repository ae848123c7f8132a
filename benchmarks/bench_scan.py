"""IntegralLNN scan h_t = a h_{t-1} + u_t, forward + backward: the Triton kernel vs the chunked PyTorch
reference, against device copy bandwidth. Optionally the entropy model's SSD (ssd_chunked) eager vs
torch.compile. Needs a CUDA GPU.

    PYTHONPATH=. python benchmarks/bench_scan.py --out out/scan.json [--check] [--sweep] [--ssd]

Memory floor of one fwd+bwd: read u, write h (forward); read dy and h, write du (backward): 5 tensors
of B*T*D elements (log_a, h0 and their gradients are negligible). Achieved bandwidth = floor bytes / time,
reported as a fraction of the measured copy bandwidth (bytes read + written per second).
Prints a Markdown table last and writes JSON to --out.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import benchmarks.bench_attention as ba  # noqa: E402
from benchmarks._checks import KernelRoute, check_choices, check_flags, int_list  # noqa: E402
from benchmarks.bench_attention import copy_bandwidth, do_bench  # noqa: E402
from ionllama.errors import OneLineParser, UserError, cli_entry  # noqa: E402
from ionllama.eval.benchmark import device_name  # noqa: E402
from ionllama.fsutil import atomic_write, ready_out_file  # noqa: E402
from ionllama.kernels import scan_const_decay  # noqa: E402
from ionllama.kernels import scan_triton as st  # noqa: E402
from ionllama.model.scan import scan_const_decay as scan_reference  # noqa: E402

DT = {"bf16": torch.bfloat16, "fp32": torch.float32}


def make(B, T, D, dtype, seed=0):
    dev = ba.DEVICE
    g = torch.Generator(device=dev).manual_seed(seed)
    u = torch.randn(B, T, D, device=dev, dtype=dtype, generator=g).requires_grad_()
    dy = torch.randn(B, T, D, device=dev, dtype=dtype, generator=g)
    log_a = (-torch.exp(torch.empty(D, device=dev).uniform_(math.log(4e-3), math.log(0.7), generator=g))
             ).requires_grad_()
    return u, log_a, dy


def fwd_bwd(fn, u, la, dy):
    def run():
        fn(u, la).backward(dy)
    return run


def time_scan(fn, B, T, D, dtype, rep):
    u, la, dy = make(B, T, D, dtype)
    try:
        ms = do_bench(fwd_bwd(fn, u, la, dy), rep=rep, grad_to_none=[u, la])
        ms_f = do_bench(lambda: fn(u.detach(), la.detach()), rep=rep)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return dict(status="OOM")
    r = dict(status="ok", ms=ms, fwd_ms=ms_f)
    if ba.GRAPH_TIMING:
        r.update(ba.graph_timing(fwd_bwd(fn, u, la, dy), [u, la], rep))
    return r


SWEEP_CONFIGS = "64,32,4;32,32,4;128,16,4;64,16,2;64,64,4;32,64,2"  # block_t,block_d,num_warps[,fold]
SWEEP_TARGETS = "1,512,1024,2048"  # min_programs (the flag's default)


def parse_configs(text: str) -> list[tuple[int, int, int, int]]:
    """--sweep_configs "bt,bd,nw[,fold];..." -> (block_t, block_d, num_warps, fold) tuples."""
    out = []
    for part in text.split(";"):
        try:
            vals = [int(v) for v in part.split(",")]
        except ValueError:
            vals = []
        if len(vals) not in (3, 4) or min(vals[:3]) < 1 or any(v & (v - 1) for v in vals[:3]) \
                or vals[3:] not in ([], [0], [1], [2]):
            raise UserError(f"--sweep_configs {text!r}: each entry is block_t,block_d,num_warps[,fold] (powers of "
                            f"two; fold 0, 1 or 2), e.g. 32,64,2;16,128,1,1")
        out.append(tuple(vals) + ((0,) if len(vals) == 3 else ()))
    return out


def _rel(x, ref):
    return ((x.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


def sweep(shapes, dtype, rep=25, configs=SWEEP_CONFIGS, targets=(1, 512, 1024, 2048)):
    """Tiles x chunking target (x fold). Times the forward and backward kernels called directly (main thread,
    no autograd), so launch overheads do not hide the kernels' own times. Each point's outputs (h, du, dlog_a)
    are compared with the configuration in force before the sweep (rel_err: the largest of the three)."""
    configs = parse_configs(configs)
    base = dict(st._CONFIG)
    try:
        return _sweep(shapes, dtype, rep, configs, targets, base)
    except BaseException:  # (interrupted: the configuration before the sweep, not its last point)
        st.set_scan_config(**base)
        raise


def _sweep(shapes, dtype, rep, configs, targets, base):
    data = []
    for B, T, D in shapes:
        u, la, dy = make(B, T, D, dtype, seed=1)
        u, la = u.detach(), la.detach()
        h = st.scan_forward(u, la, None)
        du, dla, _ = st.scan_backward(dy, h, la, None)
        data.append((u, la, dy, (h, du, dla)))
    log, score = [], {}
    for bt, bd, nw, fold in configs:
        for target in targets:
            st.set_scan_config(block_t=bt, block_d=bd, num_warps=nw, n_chunks=0, min_programs=target, fold=fold)
            tot = 0.0
            try:
                for (B, T, D), (u, la, dy, ref) in zip(shapes, data):
                    h = st.scan_forward(u, la, None)
                    du, dla, _ = st.scan_backward(dy, h, la, None)
                    err = max(_rel(x, r) for x, r in zip((h, du, dla), ref))
                    f = do_bench(lambda: st.scan_forward(u, la, None), rep=rep)
                    b = do_bench(lambda: st.scan_backward(dy, h, la, None), rep=rep)
                    tot += f + b
                    log.append(dict(block_t=bt, block_d=bd, num_warps=nw, fold=fold, min_programs=target, B=B, T=T,
                                    D=D, fwd_ms=f, bwd_ms=b, chunks_used=st._chunking(B, T, D)[0], rel_err=err))
            except Exception as e:
                log.append(dict(block_t=bt, block_d=bd, num_warps=nw, fold=fold, min_programs=target,
                                error=repr(e)[:200]))
                print(f"sweep bt={bt} bd={bd} warps={nw} fold={fold} target={target}: error {e!r}"[:300], flush=True)
                continue
            score[(bt, bd, nw, fold, target)] = tot
            print(f"sweep bt={bt} bd={bd} warps={nw} fold={fold} min_programs={target}: {tot:.3f} ms (fwd+bwd "
                  f"kernels, sum over {shapes}; rel_err {max(r.get('rel_err', 0) for r in log[-len(shapes):]):.1e})",
                  flush=True)
    st.set_scan_config(**base)
    if not score:
        return None, log
    best = min(score, key=score.get)
    st.set_scan_config(block_t=best[0], block_d=best[1], num_warps=best[2], fold=best[3], n_chunks=0,
                       min_programs=best[4])
    return dict(block_t=best[0], block_d=best[1], num_warps=best[2], fold=best[3], min_programs=best[4],
                min_chunk=st._CONFIG["min_chunk"]), log


def bench_ssd(rep, out_rows):
    """Entropy-model SSD (Mamba-2 chunked form, pure PyTorch): eager vs torch.compile, fwd+bwd."""
    from ionllama.model.ssm import ssd_chunked
    dev = ba.DEVICE
    for (b, T, H, P, N) in ([(8, 8192, 16, 16, 16)] if dev == "cuda" else [(1, 256, 2, 4, 4)]):
        g = torch.Generator(device=dev).manual_seed(0)
        x = torch.randn(b, T, H, P, device=dev, generator=g).requires_grad_()
        la = (-torch.rand(b, T, H, device=dev, generator=g) * 0.2).requires_grad_()
        Bm = torch.randn(b, T, N, device=dev, generator=g).requires_grad_()
        Cm = torch.randn(b, T, N, device=dev, generator=g).requires_grad_()
        dy = torch.randn(b, T, H, P, device=dev, generator=g)
        xs = [x, la, Bm, Cm]
        row = dict(b=b, T=T, H=H, P=P, N=N, dtype="fp32")
        eager = lambda: ssd_chunked(x, la, Bm, Cm)[0].backward(dy)  # noqa: E731
        row["eager_ms"] = do_bench(eager, rep=rep, grad_to_none=xs)
        comp = torch.compile(ssd_chunked)
        t0 = time.perf_counter()
        comp(x, la, Bm, Cm)[0].backward(dy)
        ba.sync()
        row["compile_s"] = time.perf_counter() - t0
        row["compiled_ms"] = do_bench(lambda: comp(x, la, Bm, Cm)[0].backward(dy), rep=rep, grad_to_none=xs)
        with torch.no_grad():
            ye, yc = ssd_chunked(x, la, Bm, Cm)[0], comp(x, la, Bm, Cm)[0]
            row["rel_err_compiled_vs_eager"] = ((yc - ye).norm() / ye.norm()).item()
        out_rows.append(row)
        print(f"ssd {row}", flush=True)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(description="scan fwd+bwd benchmark")
    p.add_argument("--out", required=True)
    p.add_argument("--lengths", default="2048,4096,8192,16384,32768",
                   help="T values for bf16; fp32 runs only at the one of them equal to --sweep-length")
    p.add_argument("--shapes", default="16x256,8x1024", help="BxD pairs")
    p.add_argument("--dtypes", default="bf16,fp32")
    p.add_argument("--check", action="store_true")
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--ssd", action="store_true")
    p.add_argument("--ref-max", type=int, default=32768)
    p.add_argument("--rep", type=int, default=100)
    p.add_argument("--profile", action="store_true", help="host overhead at T=2048 and kernel times at T=8192")
    p.add_argument("--sweep-length", type=int, default=8192)
    p.add_argument("--sweep_configs", default=SWEEP_CONFIGS,
                   help="the sweep's points: block_t,block_d,num_warps[,fold] entries joined by ';'")
    p.add_argument("--sweep_targets", default=SWEEP_TARGETS, help="the sweep's min_programs values, comma-joined")
    p.add_argument("--min_chunk", type=int, default=None,
                   help="the scan's shortest time chunk in steps (scan_triton config min_chunk), set before anything")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="cpu: dry run of this script under TRITON_INTERPRET=1")
    p.add_argument("--graph_timing", action="store_true",
                   help="also time fwd+bwd replayed from a CUDA graph (no host overhead; second table)")
    return p


@cli_entry
def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    check_flags(a, {"rep": 1, "sweep-length": 1, "min_chunk": 1}, a.device)
    int_list("shapes", a.shapes, "BxD")
    parse_configs(a.sweep_configs)  # before anything is timed
    targets = int_list("sweep_targets", a.sweep_targets)
    check_choices("dtypes", a.dtypes, DT)
    lengths = int_list("lengths", a.lengths)
    if "fp32" in a.dtypes.split(",") and a.sweep_length not in lengths:  # its rows were silently left out
        raise UserError(f"--dtypes fp32 runs only at T = --sweep-length ({a.sweep_length}), which is not in "
                        f"--lengths {a.lengths}; add {a.sweep_length} to --lengths or pass --sweep-length "
                        f"{lengths[0]}")
    out = ready_out_file(a.out)  # before any timing: a folder failed at the first save
    if a.min_chunk is not None:
        st.set_scan_config(min_chunk=a.min_chunk)
    ba.DEVICE, ba.GRAPH_TIMING = a.device, a.graph_timing
    import triton
    torch.backends.cuda.matmul.allow_tf32 = False
    res = dict(device=device_name(a.device) + ("" if a.device == "cuda" else " (dry run)"), torch=torch.__version__,
               triton=triton.__version__,
               python=platform.python_version(), **ba.run_info(argv), rows=[], checks=None,
               sweep=None, ssd=[])

    def save():  # atomic: a run killed mid-write keeps the previous rows
        atomic_write(out, json.dumps(res, indent=1, default=str))

    res["copy_bw_gbps"] = copy_bandwidth() / 1e9
    copy_bw = res["copy_bw_gbps"] * 1e9
    print(f"{res['device']}; copy bandwidth {res['copy_bw_gbps']:.0f} GB/s", flush=True)
    shapes = [tuple(int(x) for x in s.split("x")) for s in a.shapes.split(",")]
    if a.check:
        from ionllama.kernels.selfcheck import run as run_checks
        res["checks"] = run_checks(a.device, large=a.device == "cuda", verbose=True, kinds=("scan",))
        save()
    if a.sweep:
        best, log = sweep([(B, a.sweep_length, D) for B, D in shapes], torch.bfloat16, configs=a.sweep_configs,
                          targets=targets)
        res["sweep"] = dict(best=best, log=log)
        print(f"sweep best: {best}", flush=True)
        save()
    res["config"] = dict(st._CONFIG)
    if a.profile:
        res["profile"] = []
        for T in (2048, 8192):
            B, D = shapes[0]
            u, la, dy = make(B, T, D, torch.bfloat16)
            run = fwd_bwd(scan_const_decay, u, la, dy)
            with KernelRoute(a.device, st, "scan_forward"):
                if T == 2048:
                    res["profile"].append(ba.profile_overhead(run, f"scan fwd+bwd B={B} T={T} D={D}"))
                res["profile"].append(ba.profile_kernels(run, f"scan fwd+bwd B={B} T={T} D={D}"))
        save()
    for dt in a.dtypes.split(","):
        dtype = DT[dt]
        for B, D in shapes:
            for T in [int(t) for t in a.lengths.split(",")]:
                if dt == "fp32" and T != a.sweep_length:
                    continue  # fp32: one length per shape is enough
                elem = torch.finfo(dtype).bits // 8
                nb = 5 * B * T * D * elem
                row = dict(dtype=dt, B=B, T=T, D=D, floor_bytes=nb, floor_ms=nb / copy_bw * 1e3,
                           chunks=st._chunking(B, T, D)[0])
                with KernelRoute(a.device, st, "scan_forward") as route:
                    r = time_scan(scan_const_decay, B, T, D, dtype, a.rep)
                r = route.check(r)
                if r["status"] == "ok":
                    r["gbps"] = nb / (r["ms"] * 1e-3) / 1e9
                    r["frac_copy_bw"] = r["gbps"] * 1e9 / copy_bw
                    if r.get("graph_status") == "ok":
                        r["frac_copy_bw_graph"] = nb / (r["ms_graph"] * 1e-3) / copy_bw
                    r["fwd_frac_copy_bw"] = (2 * B * T * D * elem) / (r["fwd_ms"] * 1e-3) / copy_bw
                row["triton"] = r
                if T <= a.ref_max:
                    row["reference"] = time_scan(scan_reference, B, T, D, dtype, a.rep)
                res["rows"].append(row)
                save()
                print(f"{dt} B={B} T={T} D={D}: triton {r.get('ms', float('nan')):.3f} ms "
                      f"({r.get('frac_copy_bw', float('nan')) * 100:.0f}% of copy bw), reference "
                      f"{row.get('reference', {}).get('ms', float('nan')):.3f} ms", flush=True)
                if a.device == "cuda":
                    torch.cuda.empty_cache()
    if a.ssd:
        try:
            bench_ssd(a.rep, res["ssd"])
        except Exception as e:  # the SSD module belongs to another part of the project; report, do not die
            res["ssd"].append(dict(error=repr(e)[:500]))
            print(f"ssd failed: {e!r}", flush=True)
        save()
    save()
    print_table(res)
    return 0 if (res["checks"] is None or all(c["ok"] for c in res["checks"])) else 1


def print_table(res):
    if res.get("checks"):
        bad = [c for c in res["checks"] if not c["ok"]]
        print(f"\nscan correctness: {len(res['checks']) - len(bad)}/{len(res['checks'])} checks pass")
    print(f"\n{res['device']}; copy bw {res['copy_bw_gbps']:.0f} GB/s; fwd+bwd median ms; config {res.get('config')}")
    print("| dtype | B | T | D | chunks | ours fwd+bwd | ours fwd | reference fwd+bwd | floor | GB/s (floor bytes) "
          "| % of copy bw | ref / ours |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in res["rows"]:
        t, ref = r["triton"], r.get("reference")
        ok = t.get("status") == "ok"
        rok = ref is not None and ref.get("status") == "ok"
        print(f"| {r['dtype']} | {r['B']} | {r['T']} | {r['D']} | {r['chunks']} | "
              f"{t['ms'] if ok else float('nan'):.3f} | {t['fwd_ms'] if ok else float('nan'):.3f} | "
              f"{ref['ms'] if rok else float('nan'):.3f} | {r['floor_ms']:.3f} | "
              f"{t['gbps'] if ok else float('nan'):.0f} | {t['frac_copy_bw'] * 100 if ok else float('nan'):.0f}% | "
              f"{ref['ms'] / t['ms'] if (ok and rok) else float('nan'):.1f}x |")
    graph_rows = [r for r in res["rows"] if r["triton"].get("graph_status")]
    if graph_rows:
        print("\nreplayed from a CUDA graph (do_bench_graph), median ms per fwd+bwd:")
        print("| dtype | B | T | D | ours fwd+bwd | % of copy bw | reference fwd+bwd | ref / ours |")
        print("|---|---|---|---|---|---|---|---|")
        for r in graph_rows:
            t, ref = r["triton"], r.get("reference") or {}
            ok, rok = t.get("graph_status") == "ok", ref.get("graph_status") == "ok"
            print(f"| {r['dtype']} | {r['B']} | {r['T']} | {r['D']} | "
                  f"{t['ms_graph'] if ok else float('nan'):.3f} | "
                  f"{t['frac_copy_bw_graph'] * 100 if ok and 'frac_copy_bw_graph' in t else float('nan'):.0f}% | "
                  f"{ref['ms_graph'] if rok else float('nan'):.3f} | "
                  f"{ref['ms_graph'] / t['ms_graph'] if (ok and rok) else float('nan'):.1f}x |")
    for s in res.get("ssd", []):
        print(f"\nSSD {s}")


if __name__ == "__main__":
    sys.exit(main())
