"""IntegralLNN conv gate u = sigmoid(conv(x)_g) * conv(x)_c, forward + backward: the Triton custom op vs the
shifted-product reference compiled by Inductor (the path before the kernel), and one whole IntegralLNNBlock
(compiled, bf16 autocast, Triton scan in both arms) with the conv gate routed either way. Needs a CUDA GPU.

    PYTHONPATH=. python benchmarks/bench_conv_gate.py --out $OUT/conv_gate.json [--check] [--sweep]

--sweep (first, at the first shape; about a minute on an H200, mostly compiles): pass A's weight-gradient variant
(bwd_wgrad 0 / 1) x bwd_block_t x bwd_num_warps, then rows_per_prog and block_d at the fastest, pass B's tiles,
the dGC dtype; every point's backward (pass A + B) checked against the reference; a table fastest first.

Memory floor (B*T*D elements, e bytes each): forward reads x (2 per element) and writes u (1): 3 e; backward
reads du (1) and x (2) and writes dx (2): 5 e. The backward (two passes, conv_gate_triton's docstring) moves
9 e (dGC written and read back; 13 e with bwd_dgc_fp32=1, the default); it is also timed alone (kernels
only, per-kernel device times) besides fwd+bwd through autograd. The block arm's difference times
ionllama-small's 6 local layers is what the model's step should save. Prints a Markdown table last and
writes JSON to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import benchmarks.bench_attention as ba  # noqa: E402
from benchmarks._checks import check_choices, check_flags, int_list  # noqa: E402
from benchmarks.bench_attention import copy_bandwidth, do_bench, git_commit  # noqa: E402
import ionllama.kernels as K  # noqa: E402
from ionllama.errors import OneLineParser, UserError, cli_entry  # noqa: E402
from ionllama.eval.benchmark import device_name  # noqa: E402
from ionllama.model.conv import causal_conv_gate_reference  # noqa: E402

DT = {"bf16": torch.bfloat16, "fp32": torch.float32}


def make(B, T, D, k, dtype, seed=0):
    g = torch.Generator(device=ba.DEVICE).manual_seed(seed)
    proj = torch.randn(B, T, 3 * D, device=ba.DEVICE, dtype=dtype, generator=g).requires_grad_()  # in_proj output
    w = (torch.randn(2 * D, k, device=ba.DEVICE, generator=g) / k ** 0.5).requires_grad_()
    b = torch.randn(2 * D, device=ba.DEVICE, generator=g).requires_grad_()
    du = torch.randn(B, T, D, device=ba.DEVICE, dtype=dtype, generator=g)
    return proj, w, b, du


def time_op(fn, B, T, D, k, dtype, rep):
    proj, w, b, du = make(B, T, D, k, dtype)
    D2 = 2 * D
    fwd = lambda: fn(proj[..., :D2], w.to(dtype), b.to(dtype))  # noqa: E731  (the dispatcher's casts)
    ms = do_bench(lambda: fwd().backward(du), rep=rep, grad_to_none=[proj, w, b])
    with torch.no_grad():
        ms_f = do_bench(fwd, rep=rep)
    return dict(ms=ms, fwd_ms=ms_f)


def time_bwd(B, T, D, k, dtype, rep):
    """The backward kernels alone (conv_gate_backward: no autograd, no forward); and the device time of each
    of its kernels (torch.profiler)."""
    from ionllama.kernels import conv_gate_triton as cg
    proj, w, b, du = make(B, T, D, k, dtype, seed=1)
    x, w, b = proj.detach()[..., :2 * D], w.detach().to(dtype), b.detach().to(dtype)
    run = lambda: cg.conv_gate_backward(du, x, w, b)  # noqa: E731
    return dict(bwd_ms=do_bench(run, rep=rep), kernels=ba.profile_kernels(run, "conv_gate_backward"))


def time_block(B, T, D, k, rep, conv_gate: str):
    """IntegralLNNBlock fwd+bwd under torch.compile and bf16 autocast, the input fp32 (the model's residual)."""
    from ionllama.model.common import swiglu_hidden
    from ionllama.model.integral_lnn import IntegralLNNBlock

    saved = K.conv_gate_uses_triton
    if conv_gate == "reference":
        K.conv_gate_uses_triton = lambda *a: False
    try:
        torch.manual_seed(0)
        blk = IntegralLNNBlock(D, swiglu_hidden(D), conv_kernel=k).to(ba.DEVICE)
        x = torch.randn(B, T, D, device=ba.DEVICE, requires_grad=True)
        dy = torch.randn(B, T, D, device=ba.DEVICE)
        torch._dynamo.reset()
        fn = torch.compile(blk)
        amp = torch.autocast(ba.DEVICE, dtype=torch.bfloat16, enabled=ba.DEVICE == "cuda")

        def run():
            with amp:
                y = fn(x)
            y.backward(dy)

        params = [x] + list(blk.parameters())
        ms = do_bench(run, rep=rep, grad_to_none=params)
        prof = ba.profile_kernels(run, f"block conv_gate={conv_gate}") if ba.DEVICE == "cuda" else None
    finally:
        K.conv_gate_uses_triton = saved
        torch._dynamo.reset()
    return dict(ms=ms, kernels=prof)


# Pass A's grid (bwd_wgrad: conv_gate_triton's _CONFIG comment). bwd_block_t 16 as well: ptxas for sm_90 (no GPU
# needed) reports spills for the deferred variant at 4 warps from 32 rows up, and for the per-tile one at 32 x 4.
GATE_GRID = dict(bwd_wgrad=(0, 1), bwd_block_t=(16, 32, 64, 128), bwd_num_warps=(4, 8))
# then, for the fastest few: more or fewer rows per program (min_programs 1 lets rows_per_prog > 256 stand at
# B 8 x T 8192), and narrower channel tiles (block_d is shared with the forward)
GATE_REFINE = [dict(rows_per_prog=128), dict(rows_per_prog=512, min_programs=1),
               dict(rows_per_prog=1024, min_programs=1), dict(block_d=32)]
DX_CFGS = [(32, 128, 4), (64, 128, 4), (32, 256, 4), (64, 256, 8), (128, 64, 4), (128, 128, 8)]
FWD_CFGS = [(32, 64, 4), (64, 64, 4), (32, 128, 4), (16, 128, 4), (64, 32, 2), (64, 128, 8)]


def sweep(B, T, D, k, rep=20, warmup=10):
    """Launch configs, timing the kernels called directly (no autograd): the forward's tiles; then the backward
    (pass A + pass B, conv_gate_backward) over GATE_GRID with the other keys at their defaults, GATE_REFINE on
    the 3 fastest points, pass B's tiles with the best pass A, the other dGC dtype. Every backward point's dx,
    dweight, dbias are checked against the reference (fp32 autograd of causal_conv_gate_reference on the same
    bf16 values; bf16 tolerance as the selfcheck's); a point that fails to compile or run is logged, not fatal.
    Prints the backward points as a table sorted by time, and the best."""
    import itertools

    from ionllama.kernels import conv_gate_triton as cg
    from ionllama.kernels.selfcheck import TOL, rel_err
    proj, w, b, du = make(B, T, D, k, torch.bfloat16, seed=1)
    x, w, b = proj.detach()[..., :2 * D], w.detach().to(torch.bfloat16), b.detach().to(torch.bfloat16)
    r_ins = [t.float().requires_grad_() for t in (x, w, b)]
    ref = torch.autograd.grad(causal_conv_gate_reference(*r_ins), r_ins, du.float())
    del r_ins
    tol = TOL[torch.bfloat16]
    old = dict(cg._CONFIG)
    log, best_f = [], None

    def bwd(**cfg):
        full = {**old, **cfg}
        seen = next((r for r in log if r.get("full") == full), None)
        if seen is not None:  # already measured (the defaults, or a refinement landing on a grid point)
            return seen
        cg.set_conv_gate_config(**full)
        row = dict(kind="bwd", **cfg, eff_rows_per_prog=cg._rows_per_prog(B, T, D),
                   wgrad_run=cg._wgrad_variant(k), full=full)
        try:
            got = cg.conv_gate_backward(du, x, w, b)
            row["err"] = max(rel_err(g, r) for g, r in zip(got, ref))
            del got
            row["ok"] = row["err"] <= tol
            row["ms"] = do_bench(lambda: cg.conv_gate_backward(du, x, w, b), rep=rep, warmup=warmup)
        except Exception as e:  # e.g. out of shared memory / registers at a large tile
            row.update(ok=False, ms=float("inf"), error=f"{type(e).__name__}: {str(e)[:200]}")
        finally:
            cg.set_conv_gate_config(**old)
        log.append(row)
        print(f"sweep bwd {cfg}: {row['ms']:.4f} ms, rel err {row.get('err', float('nan')):.1e}"
              f"{'' if row['ok'] else ' FAILED ' + row.get('error', f'(tolerance {tol:.0e})')}", flush=True)
        return row

    def best_rows(n=1):
        ok = sorted((r for r in log if r["kind"] == "bwd" and r["ok"]), key=lambda r: r["ms"])
        return ok[:n]

    def keys(row):
        return {key: row[key] for key in old if key in row}

    for bt, bd, nw in FWD_CFGS:
        cg.set_conv_gate_config(block_t=bt, block_d=bd, num_warps=nw)
        f = do_bench(lambda: cg.conv_gate_forward(x, w, b), rep=rep, warmup=warmup)
        log.append(dict(kind="fwd", block_t=bt, block_d=bd, num_warps=nw, ms=f))
        print(f"sweep fwd block_t={bt} block_d={bd} warps={nw}: {f:.4f} ms", flush=True)
        best_f = min(best_f or (f, bt, bd, nw), (f, bt, bd, nw))
    cg.set_conv_gate_config(**old)
    default = bwd()  # the defaults, first
    for vals in itertools.product(*GATE_GRID.values()):
        bwd(**dict(zip(GATE_GRID, vals)))
    for top in best_rows(3):
        for extra in GATE_REFINE:
            bwd(**{**keys(top), **extra})
    gate_best = keys(best_rows()[0]) if best_rows() else {}
    for dbt, dbc, dnw in DX_CFGS:
        bwd(**gate_best, dx_block_t=dbt, dx_block_c=dbc, dx_num_warps=dnw)
    both_best = keys(best_rows()[0]) if best_rows() else {}
    bwd(**{**both_best, "bwd_dgc_fp32": 1 - old["bwd_dgc_fp32"]})  # the other dGC dtype
    best = best_rows()[0] if best_rows() else None
    kernels = {}
    for name, row in (("default", default), ("best", best)):  # pass A and pass B device times apart
        if row is not None and row["ok"]:
            cg.set_conv_gate_config(**{**old, **keys(row)})
            kernels[name] = ba.profile_kernels(lambda: cg.conv_gate_backward(du, x, w, b), f"conv_gate_backward {name}")
            cg.set_conv_gate_config(**old)
    print_bwd_table(log, old)
    if best is not None:
        print(f"best backward: {best['ms']:.4f} ms ({default['ms'] / best['ms']:.2f}x the defaults' "
              f"{default['ms']:.4f} ms): {keys(best)}", flush=True)
    return dict(best_fwd=dict(ms=best_f[0], block_t=best_f[1], block_d=best_f[2], num_warps=best_f[3]),
                best_bwd=best, default_bwd=default, kernels=kernels, tol=tol,
                note="fwd and bwd share block_d: set one value for both; config keys not in a row are the defaults "
                     "(see 'config')", log=log)


def print_bwd_table(log, default_cfg):
    """The backward points as a Markdown table, fastest first; a blank cell is the default."""
    cols = ["bwd_wgrad", "bwd_block_t", "bwd_num_warps", "block_d", "rows_per_prog", "min_programs", "dx_block_t",
            "dx_block_c", "dx_num_warps", "bwd_dgc_fp32"]
    rows = sorted((r for r in log if r["kind"] == "bwd"), key=lambda r: r["ms"])
    print(f"\n| rank | {' | '.join(cols)} | eff. rows/prog | ms | rel err | ok |")
    print("|" + "---|" * (len(cols) + 5))
    for i, r in enumerate(rows, 1):
        cells = [str(r[c]) if c in r else "" for c in cols]
        print(f"| {i} | {' | '.join(cells)} | {r['eff_rows_per_prog']} | {r['ms']:.4f} | {r.get('err', float('nan')):.1e} "
              f"| {'yes' if r['ok'] else 'NO'} |")
    print(f"(defaults: {', '.join(f'{c}={default_cfg[c]}' for c in cols)})", flush=True)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(description="conv gate fwd+bwd benchmark")
    p.add_argument("--out", required=True)
    p.add_argument("--shapes", default="8x8192x256,64x1024x256", help="BxTxD triples (ionllama-small: D=256)")
    p.add_argument("--kernel", type=int, default=4, help="conv taps (ModelConfig.conv_kernel)")
    p.add_argument("--dtypes", default="bf16")
    p.add_argument("--check", action="store_true", help="run the selfcheck's conv_gate and block cases first")
    p.add_argument("--sweep", action="store_true",
                   help="launch-config sweep at the first shape (sweep(): pass A's bwd_wgrad x bwd_block_t x "
                        "bwd_num_warps, each point checked against the reference; the defaults are untuned)")
    p.add_argument("--no-block", action="store_true", help="skip the compiled-IntegralLNNBlock A/B")
    p.add_argument("--rep", type=int, default=100)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="cpu: dry run of this script under TRITON_INTERPRET=1")
    return p


@cli_entry
def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    check_flags(a, {"kernel": 1, "rep": 1}, a.device)
    int_list("shapes", a.shapes, "BxTxD")
    check_choices("dtypes", a.dtypes, DT)
    if a.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":  # the op is forced onto Triton below
        raise UserError("--device cpu runs the Triton kernels in the interpreter: set TRITON_INTERPRET=1")
    ba.DEVICE = a.device
    import triton
    torch.backends.cuda.matmul.allow_tf32 = False
    res = dict(device=device_name(a.device) + ("" if a.device == "cuda" else " (dry run)"), torch=torch.__version__,
               triton=triton.__version__, python=platform.python_version(), commit=git_commit(), argv=sys.argv,
               rows=[], checks=None, sweep=None)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save():
        out.write_text(json.dumps(res, indent=1, default=str))

    shapes = [tuple(int(v) for v in s.split("x")) for s in a.shapes.split(",")]
    if a.device != "cuda":
        shapes = [(1, 64, 16)]  # dry run: the interpreter
    res["copy_bw_gbps"] = copy_bandwidth() / 1e9
    copy_bw = res["copy_bw_gbps"] * 1e9
    print(f"{res['device']}; copy bandwidth {res['copy_bw_gbps']:.0f} GB/s", flush=True)
    if a.check:
        from ionllama.kernels.selfcheck import run as run_checks
        res["checks"] = run_checks(a.device, large=a.device == "cuda", verbose=True, kinds=("conv_gate", "block"))
        save()
    if a.sweep:
        res["sweep"] = sweep(*shapes[0], a.kernel)
        bb = res["sweep"]["best_bwd"]
        print(f"sweep best: fwd {res['sweep']['best_fwd']}; bwd "
              f"{'none passed' if bb is None else {**bb['full'], 'ms': round(bb['ms'], 4)}}", flush=True)
        save()
    from ionllama.kernels import conv_gate_triton as cg
    res["config"] = dict(cg._CONFIG)
    compiled_ref = torch.compile(causal_conv_gate_reference)
    with K.forced_routing(True):
        for dt in a.dtypes.split(","):
            dtype = DT[dt]
            elem = torch.finfo(dtype).bits // 8
            for B, T, D in shapes:
                n = B * T * D * elem
                row = dict(dtype=dt, B=B, T=T, D=D, k=a.kernel, floor_fwd_ms=3 * n / copy_bw * 1e3,
                           floor_ms=8 * n / copy_bw * 1e3)
                row["triton"] = time_op(K.causal_conv_gate, B, T, D, a.kernel, dtype, a.rep)
                row["inductor_reference"] = time_op(compiled_ref, B, T, D, a.kernel, dtype, a.rep)
                row["triton"]["frac_copy_bw"] = 8 * n / (row["triton"]["ms"] * 1e-3) / copy_bw
                row["floor_bwd_ms"] = 5 * n / copy_bw * 1e3
                r = time_bwd(B, T, D, a.kernel, dtype, a.rep)  # the backward's kernels alone
                r["bwd_frac_copy_bw"] = 5 * n / (r["bwd_ms"] * 1e-3) / copy_bw  # the floor's 5 units
                row["bwd"] = r
                res["rows"].append(row)
                save()
                print(f"{dt} B={B} T={T} D={D}: triton fwd+bwd {row['triton']['ms']:.3f} ms "
                      f"({row['triton']['frac_copy_bw'] * 100:.0f}% of copy bw; fwd {row['triton']['fwd_ms']:.3f}), "
                      f"inductor reference {row['inductor_reference']['ms']:.3f} ms "
                      f"(fwd {row['inductor_reference']['fwd_ms']:.3f})", flush=True)
                print(f"  backward: kernels alone {r['bwd_ms']:.3f} ms "
                      f"(floor {row['floor_bwd_ms']:.3f} ms, {r['bwd_frac_copy_bw'] * 100:.0f}%; "
                      f"per kernel: the [kernels] lines)", flush=True)
        if not a.no_block:  # the scan stays on its custom op in both arms; only the conv gate's routing differs
            for B, T, D in shapes[:1]:
                row = dict(kind="block", B=B, T=T, D=D, k=a.kernel,
                           triton=time_block(B, T, D, a.kernel, a.rep, "triton"),
                           reference=time_block(B, T, D, a.kernel, a.rep, "reference"))
                res["rows"].append(row)
                save()
                print(f"IntegralLNNBlock B={B} T={T} D={D} compiled fwd+bwd: conv gate triton "
                      f"{row['triton']['ms']:.3f} ms, reference {row['reference']['ms']:.3f} ms", flush=True)
    print("\n| what | dtype | B | T | D | triton ms | reference ms | fwd: triton / reference ms |")
    print("|---|---|---|---|---|---|---|---|")
    for r in res["rows"]:
        if r.get("kind") == "block":
            print(f"| compiled IntegralLNNBlock fwd+bwd | bf16 autocast | {r['B']} | {r['T']} | {r['D']} | "
                  f"{r['triton']['ms']:.3f} | {r['reference']['ms']:.3f} | |")
        else:
            print(f"| conv gate fwd+bwd | {r['dtype']} | {r['B']} | {r['T']} | {r['D']} | {r['triton']['ms']:.3f} | "
                  f"{r['inductor_reference']['ms']:.3f} | {r['triton']['fwd_ms']:.3f} / "
                  f"{r['inductor_reference']['fwd_ms']:.3f} |")
    print("\n| backward | dtype | B | T | D | kernels alone ms | floor ms |")
    print("|---|---|---|---|---|---|---|")
    for r in res["rows"]:
        if "bwd" in r:
            print(f"| conv gate | {r['dtype']} | {r['B']} | {r['T']} | {r['D']} | {r['bwd']['bwd_ms']:.3f} | "
                  f"{r['floor_bwd_ms']:.3f} |")
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
