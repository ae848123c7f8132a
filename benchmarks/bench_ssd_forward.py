"""A whole model's no-grad forward with the Mamba-2 scan kernel (kernels/ssd_triton.py) against its PyTorch
reference (ssm.ssd_chunked), alternating in one process; prints ms per forward and the largest logit difference.

Why a model and not the scan alone: the question is whether the kernel pays where it would run (evaluation and
prefill of MambaByte, whose heads are 64 x 64 and above SSD_KERNEL_MAX_DIM), including everything around it.
The width limit is lifted for the run (--max_dim), so the kernel is used at the model's own widths.

    python3 benchmarks/bench_ssd_forward.py --model mamba --size small --batch 8 --seq 8192 --max_dim 64
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


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mamba")
    p.add_argument("--size", default="small")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--max_dim", type=int, default=64, help="SSD_KERNEL_MAX_DIM for this run")
    a = p.parse_args()
    if not torch.cuda.is_available():
        print("bench_ssd_forward.py needs a CUDA GPU (the kernel is Triton on CUDA); run it on the device", file=sys.stderr)
        raise SystemExit(2)
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
