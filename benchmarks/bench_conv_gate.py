"""IntegralLNN conv gate u = sigmoid(conv(x)_g) * conv(x)_c, forward + backward: the Triton custom op vs the
shifted-product reference compiled by Inductor (the path before the kernel), and one whole IntegralLNNBlock
(compiled, bf16 autocast, Triton scan in both arms) with the conv gate routed either way. Needs a CUDA GPU.

    PYTHONPATH=. python benchmarks/bench_conv_gate.py --out $OUT/conv_gate.json [--check] [--sweep]

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
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import benchmarks.bench_attention as ba  # noqa: E402
from benchmarks.bench_attention import copy_bandwidth, do_bench, git_commit  # noqa: E402
import ionllama.kernels as K  # noqa: E402
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


def sweep(B, T, D, k, rep=25):
    """Tiles and rows per backward program, timing the kernels called directly (no autograd): the forward, then
    the backward (pass A's tiles with pass B's defaults, pass B's tiles with the best pass A, the dGC dtype)."""
    from ionllama.kernels import conv_gate_triton as cg
    proj, w, b, du = make(B, T, D, k, torch.bfloat16, seed=1)
    x, w, b = proj.detach()[..., :2 * D], w.detach().to(torch.bfloat16), b.detach().to(torch.bfloat16)
    fwd_cfgs = [(32, 64, 4), (64, 64, 4), (32, 128, 4), (16, 128, 4), (64, 32, 2), (64, 128, 8)]
    bwd_cfgs = [(32, 4, 256), (32, 8, 256), (16, 4, 256), (32, 4, 512), (32, 4, 128), (64, 8, 256), (16, 2, 256)]
    gate_cfgs = bwd_cfgs + [(64, 4, 256), (64, 4, 1024), (128, 8, 512), (128, 8, 2048)]
    dx_cfgs = [(32, 128, 4), (64, 128, 4), (32, 256, 4), (64, 256, 8), (16, 256, 4), (128, 64, 4), (32, 64, 2),
               (128, 128, 8), (8, 512, 4)]
    old = dict(cg._CONFIG)
    log, best_f, best = [], None, None

    def bwd(**cfg):
        nonlocal best
        cg.set_conv_gate_config(**cfg)
        f = do_bench(lambda: cg.conv_gate_backward(du, x, w, b), rep=rep)
        log.append(dict(kind="bwd", ms=f, **cfg))
        print(f"sweep bwd {cfg}: {f:.4f} ms", flush=True)
        if best is None or f < best["ms"]:
            best = dict(ms=f, **cfg)

    for bt, bd, nw in fwd_cfgs:
        cg.set_conv_gate_config(block_t=bt, block_d=bd, num_warps=nw)
        f = do_bench(lambda: cg.conv_gate_forward(x, w, b), rep=rep)
        log.append(dict(kind="fwd", block_t=bt, block_d=bd, num_warps=nw, ms=f))
        print(f"sweep fwd block_t={bt} block_d={bd} warps={nw}: {f:.4f} ms", flush=True)
        best_f = min(best_f or (f, bt, bd, nw), (f, bt, bd, nw))
    cg.set_conv_gate_config(**old)
    for bd in sorted({old["block_d"], 32, 128}):
        for bt, nw, rpp in gate_cfgs:
            bwd(block_d=bd, bwd_block_t=bt, bwd_num_warps=nw, rows_per_prog=rpp)
    gate_best = {key: val for key, val in best.items() if key != "ms"}
    for dbt, dbc, dnw in dx_cfgs:
        bwd(**gate_best, dx_block_t=dbt, dx_block_c=dbc, dx_num_warps=dnw)
    both_best = {key: val for key, val in best.items() if key != "ms"}
    bwd(**{**both_best, "bwd_dgc_fp32": 0})  # the other dGC dtype (the default is fp32)
    cg.set_conv_gate_config(**old)
    return dict(best_fwd=dict(ms=best_f[0], block_t=best_f[1], block_d=best_f[2], num_warps=best_f[3]),
                best_bwd=best, note="fwd and bwd share block_d: set one value for both", log=log)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="conv gate fwd+bwd benchmark")
    p.add_argument("--out", required=True)
    p.add_argument("--shapes", default="8x8192x256,64x1024x256", help="BxTxD triples (ionllama-small: D=256)")
    p.add_argument("--kernel", type=int, default=4, help="conv taps (ModelConfig.conv_kernel)")
    p.add_argument("--dtypes", default="bf16")
    p.add_argument("--check", action="store_true", help="run the selfcheck's conv_gate and block cases first")
    p.add_argument("--sweep", action="store_true", help="tile sweep at the first shape (the defaults are untuned)")
    p.add_argument("--no-block", action="store_true", help="skip the compiled-IntegralLNNBlock A/B")
    p.add_argument("--rep", type=int, default=100)
    p.add_argument("--device", default="cuda", help="cpu: dry run of this script under TRITON_INTERPRET=1")
    a = p.parse_args(argv)
    ba.DEVICE = a.device
    import triton
    torch.backends.cuda.matmul.allow_tf32 = False
    res = dict(device=torch.cuda.get_device_name() if a.device == "cuda" else "cpu (dry run)", torch=torch.__version__,
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
        print(f"sweep best: {res['sweep']['best_fwd']} {res['sweep']['best_bwd']}", flush=True)
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
