"""How far the dilated-attention kernel's bf16 gradients are from exact, next to FlashAttention's own yardstick.

For each logit std, on the same bf16 q / k / v / dO, three sets of (out, dq, dk, dv) are compared with the fp64
reference (model/dilated_attention.py):
  kernel   the Triton kernel (ionllama.kernels.dilated_attention_triton), bf16 in and out; its backward takes
           Delta = rowsum(dO * O) from an fp32 O the forward keeps for 16-bit inputs;
  naive    attention computed in bf16 (scores and P @ V in bf16, softmax in fp32), as FlashAttention's tests build
           their "PyTorch" baseline: a kernel passes there when its error is at most twice this one's;
  bf16 O   the kernel's backward given the bf16-rounded O for Delta instead, as FlashAttention does (and this
           kernel did until the forty-sixth session).
Why: with the rounded O the kernel's dq / dk reached 2.7e-2 relative error at logit std 16 in an audit; this measures
whether the fp32 O removes it. Prints one line per (std, tensor) and writes --out as JSON.

    python benchmarks/attention_bf16_grads.py --device cpu --out /tmp/att_bf16.json   (Triton's interpreter)
    python3 benchmarks/attention_bf16_grads.py --device cuda --n 4096 --out $OUT/att_bf16.json
"""
from __future__ import annotations

import json
import math
import os
import sys

from ionllama.errors import OneLineParser, UserError, check_ranges, cli_entry


def build_parser() -> OneLineParser:
    p = OneLineParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cpu: Triton's interpreter (slow: keep --n small)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--n", type=int, default=64, help="sequence length (patches)")
    p.add_argument("--head_dim", type=int, default=64)
    p.add_argument("--stds", default="1,4,8,16", help="comma list of logit standard deviations")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="JSON file to write")
    return p


def naive_bf16(q, k, v, offsets, scale):
    """Attention in the inputs' dtype, softmax in fp32 (FlashAttention's test baseline, upcast=False)."""
    import torch
    N = q.shape[2]
    offs = torch.tensor([o for o in offsets if o < N], device=q.device)
    idx = torch.arange(N, device=q.device)[:, None] - offs[None]
    s = torch.einsum("bhnd,bhnkd->bhnk", q, k[:, :, idx.clamp_min(0)]) * scale
    p = torch.softmax(s.float().masked_fill(idx < 0, float("-inf")), -1).to(q.dtype)
    return torch.einsum("bhnk,bhnkd->bhnd", p, v[:, :, idx.clamp_min(0)])


def measure(a) -> list[dict]:
    import torch
    import ionllama.kernels.dilated_attention_triton as T
    from ionllama.model.dilated_attention import dilated_attention_reference, dilated_offsets

    dev = torch.device(a.device)
    offsets = dilated_offsets(a.n, 3)
    scale = 1 / math.sqrt(a.head_dim)
    rows = []
    for std in (float(s) for s in a.stds.split(",")):
        g = torch.Generator(device="cpu").manual_seed(a.seed)
        shape = (a.batch, a.heads, a.n, a.head_dim)
        # q . k * scale has std (sqrt(std))^2 * sqrt(Dh) * scale = std
        q, k = ((torch.randn(shape, generator=g) * math.sqrt(std)).bfloat16().to(dev) for _ in range(2))
        v, do = (torch.randn(shape, generator=g).bfloat16().to(dev) for _ in range(2))

        def run(fn, dtype):
            leaves = [t.to(dtype).clone().requires_grad_() for t in (q, k, v)]  # fresh leaves: no shared .grad
            out = fn(*leaves)
            out.backward(do.to(dtype))
            return [out.detach().double()] + [t.grad.double() for t in leaves]

        exact = run(lambda x, y, z: dilated_attention_reference(x, y, z, offsets, scale=scale), torch.float64)
        kern = run(lambda x, y, z: T.dilated_attention_triton(x, y, z, offsets, scale=scale), torch.bfloat16)
        naive = run(lambda x, y, z: naive_bf16(x, y, z, offsets, scale), torch.bfloat16)
        offs = T._prep_offsets(offsets, a.n, dev)
        o16, lse = T.attention_forward(q, k, v, offs, None, scale)
        bf16_o = [kern[0]] + [t.double() for t in T.attention_backward(do, q, k, v, o16, lse, offs, None, scale)]
        for i, name in enumerate(("out", "dq", "dk", "dv")):
            ref = exact[i]
            row = {"std": std, "tensor": name}
            for arm, got in (("kernel", kern[i]), ("naive_bf16", naive[i]), ("kernel_bf16_o", bf16_o[i])):
                err = (got - ref).abs()
                row[arm] = {"max_abs": err.max().item(), "rel_l2": (err.norm() / ref.norm()).item()}
            row["kernel_over_naive_max"] = row["kernel"]["max_abs"] / row["naive_bf16"]["max_abs"]
            rows.append(row)
            print(f"std {std:>4g} {name:>3}: rel L2 kernel {row['kernel']['rel_l2']:.2e}  naive "
                  f"{row['naive_bf16']['rel_l2']:.2e}  bf16 O {row['kernel_bf16_o']['rel_l2']:.2e} | max abs kernel "
                  f"{row['kernel']['max_abs']:.2e} = {row['kernel_over_naive_max']:.2f} x naive", flush=True)
    return rows


@cli_entry
def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    check_ranges(a, {"batch": 1, "heads": 1, "n": 1, "head_dim": 1})
    try:
        stds = [float(s) for s in a.stds.split(",")]
    except ValueError:
        stds = []
    if not stds or not all(math.isfinite(s) and s > 0 for s in stds):
        raise UserError(f"--stds '{a.stds}': give a comma list of positive numbers, e.g. 1,4,8,16")
    if os.path.isdir(a.out):
        raise UserError(f"--out {a.out} is a folder: give a file name, e.g. {a.out.rstrip('/')}/att_bf16.json")
    if a.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # read when triton is first imported, below
    else:
        import torch
        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device is visible; run with --device cpu (Triton's interpreter)")
    rows = measure(a)
    import torch
    from ionllama.fsutil import atomic_write
    meta = {k: getattr(a, k) for k in ("device", "batch", "heads", "n", "head_dim", "stds", "seed")}
    meta["torch"] = torch.__version__
    atomic_write(a.out, json.dumps({"config": meta, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
