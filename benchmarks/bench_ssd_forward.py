"""A whole model's no-grad forward with the Mamba-2 scan kernel (kernels/ssd_triton.py) against its PyTorch
reference (ssm.ssd_chunked), alternating in one process; prints ms per forward and the largest logit difference.

Why a model and not the scan alone: the question is whether the kernel pays where it would run (evaluation and
prefill of MambaByte, whose heads are 64 x 64 and above SSD_KERNEL_MAX_DIM), including everything around it.
The width limit is lifted for the run (--max_dim), so the kernel is used at the model's own widths.

    python3 benchmarks/bench_ssd_forward.py --model mamba --size small --batch 8 --seq 8192 --max_dim 64

--scan: the scan alone (ssd_triton.ssd_forward) at the entropy model's heads (16 of 16 channels, state 16, chunk 64;
bf16 x / B / C, fp32 log_a, as stage A's autocast gives them), its sequential form (split 0) against the
chunk-parallel one (split 1; 2 = "auto"), points alternating (A B A B) in one process; prints us per call and each
form's largest relative difference from split 0 and from ssd_chunked in fp64:

    python3 benchmarks/bench_ssd_forward.py --scan --shapes 8192x8 1024x64 --splits 0 1
"""
import argparse
import sys
import time

import torch

import ionllama.kernels as K
from ionllama import create_model


def timed_forward(model, x, kernel: bool, reps: int, warmup: int = 3) -> tuple[float, torch.Tensor]:
    K.SSD_SCAN_KERNEL = kernel  # read at call time by ssd_uses_triton
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
        for _ in range(warmup):
            out = model(x)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(reps):
            out = model(x)
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps * 1000, out["logits"].float()


def _scan_inputs(B: int, T: int, H: int, P: int, N: int, seed: int = 0):
    """Decays as the model's (dt in [1e-3, 0.1], A in [1, 16]), x scaled by dt; never zeros."""
    import math
    gen = torch.Generator(device="cuda").manual_seed(seed)
    dt = torch.exp(torch.empty(B, T, H, device="cuda").uniform_(math.log(1e-3), math.log(0.1), generator=gen))
    log_a = -dt * torch.empty(H, device="cuda").uniform_(1, 16, generator=gen)
    x = (torch.randn(B, T, H, P, device="cuda", generator=gen) * dt[..., None]).bfloat16()
    Bm = torch.randn(B, T, N, device="cuda", generator=gen).bfloat16()
    Cm = torch.randn(B, T, N, device="cuda", generator=gen).bfloat16()
    return x, log_a, Bm, Cm


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def scan_table(a) -> None:
    from ionllama.kernels import ssd_triton as st
    from ionllama.model.ssm import ssd_chunked
    extra = dict(kv.split("=") for kv in a.ssd_config)
    print(f"ssd_forward H{a.heads} P{a.headdim} N{a.d_state} chunk {a.chunk}, bf16 x/B/C; config {extra or 'default'}")
    print("| shape (T x B) | split | us/call (median) | points | rel diff vs split 0 | rel diff vs fp64 ref |")
    print("|---|---|---|---|---|---|")
    for shape in a.shapes:
        T, B = (int(v) for v in shape.split("x"))
        ins = _scan_inputs(B, T, a.heads, a.headdim, a.d_state)
        with torch.no_grad():
            ref_y, ref_s = ssd_chunked(*(t.double() for t in ins), a.chunk)
        times, outs = {s: [] for s in a.splits}, {}
        for _ in range(a.points):
            for split in a.splits:
                old = st.set_ssd_config(split=split, **extra)
                try:
                    for _ in range(3):  # warm-up (and the first call's compile)
                        outs[split] = st.ssd_forward(*ins, None, a.chunk)
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    torch.cuda.synchronize()
                    start.record()
                    for _ in range(a.scan_reps):
                        st.ssd_forward(*ins, None, a.chunk)
                    end.record()
                    torch.cuda.synchronize()
                    times[split].append(start.elapsed_time(end) * 1000 / a.scan_reps)
                finally:
                    st.set_ssd_config(**old)
        base = outs[a.splits[0]]
        for split in a.splits:
            y, s = outs[split]
            ts = sorted(times[split])
            print(f"| {T} x {B} | {split} | {ts[len(ts) // 2]:.1f} | {', '.join(f'{t:.1f}' for t in times[split])} "
                  f"| y {_rel(y, base[0]):.2e} state {_rel(s, base[1]):.2e} "
                  f"| y {_rel(y, ref_y):.2e} state {_rel(s, ref_s):.2e} |")
            # the forms agree to fp32 rounding (y rounded to bf16: one bf16 ulp, 2^-8 relative, at most)
            if max(_rel(y, base[0]), _rel(s, base[1])) > 1e-2:
                print(f"MISMATCH split {split} at {shape}", file=sys.stderr)
                raise SystemExit(1)
        del ins, ref_y, ref_s, outs
        torch.cuda.empty_cache()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mamba")
    p.add_argument("--size", default="small")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--max_dim", type=int, default=64, help="SSD_KERNEL_MAX_DIM for this run")
    p.add_argument("--scan", action="store_true", help="time the scan alone, split 0 against 1 (see the docstring)")
    p.add_argument("--shapes", nargs="+", default=["8192x8", "1024x64"], help="--scan: T x B")
    p.add_argument("--splits", nargs="+", type=int, default=[0, 1], choices=[0, 1, 2], help="--scan: ssd split forms")
    p.add_argument("--ssd_config", nargs="*", default=[], help="--scan: other set_ssd_config keys, key=int")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--headdim", type=int, default=16)
    p.add_argument("--d_state", type=int, default=16)
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--points", type=int, default=4, help="--scan: timed points per form (alternating)")
    p.add_argument("--scan_reps", type=int, default=50, help="--scan: calls per timed point")
    return p


def main():
    a = build_parser().parse_args()
    if not torch.cuda.is_available():
        print("bench_ssd_forward.py needs a CUDA GPU (the kernel is Triton on CUDA); run it on the device", file=sys.stderr)
        raise SystemExit(2)
    if a.scan:
        scan_table(a)
        return
    K.SSD_KERNEL_MAX_DIM = a.max_dim
    m = create_model(a.size, model=a.model).cuda().eval()
    x = torch.randint(0, 256, (a.batch, a.seq), device="cuda")
    for kernel in (False, True, False, True):
        ms, _ = timed_forward(m, x, kernel, a.reps)
        print(f"kernel {kernel} {ms:.2f} ms/forward B{a.batch}xT{a.seq}")
    ref, ker = timed_forward(m, x, False, 1, 1)[1], timed_forward(m, x, True, 1, 1)[1]
    print("max abs logit diff", (ref - ker).abs().max().item())


if __name__ == "__main__":
    main()
