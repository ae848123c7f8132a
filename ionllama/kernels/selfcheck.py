"""Correctness checks of the Triton kernels against the PyTorch references (forward and every gradient).

Used by tests/test_kernels.py (CPU tensors under TRITON_INTERPRET=1, or CUDA) and by the GPU benchmark
scripts. Inputs are fresh random draws on every call (never zeros); outputs are relative errors
||out - ref|| / ||ref||. The reference runs in fp32 (attention; it upcasts internally) or fp64 (scan, conv gate) on
the same rounded inputs and the same output gradient.

    TRITON_INTERPRET=1 python -m ionllama.kernels.selfcheck --device cpu --json out.json
    python -m ionllama.kernels.selfcheck --device cuda --large
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import sys
import time

import torch

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _random_segments(B: int, N: int, gen: torch.Generator) -> torch.Tensor:
    """Packed batch: 1..4 segments per row with random boundaries (ids increase along the row). The first row has
    at least one: with B=1 a quarter of the draws had none, and a kernel that ignored the segments passed (an audit
    removed the mask from one backward kernel; 3 of 12 seeds missed it)."""
    seg = torch.zeros(B, N, dtype=torch.long)
    for b in range(B):
        n_cuts = int(torch.randint(1 if b == 0 else 0, 4, (1,), generator=gen))
        cuts = torch.randint(1, max(N, 2), (n_cuts,), generator=gen)
        for c in cuts.tolist():
            seg[b, c:] += 1
    return seg


def check_attention(device: str, dtype: torch.dtype, B: int, H: int, N: int, Dh: int, segments: bool = False,
                    store_ds: bool = True, prefetch: bool | None = None, local_width: int = 3,
                    with_lse: bool = False, logit_std: float = 1.0, seed: int | None = None) -> dict:
    """with_lse: the lse is returned and used in the loss too (its gradient was dropped, silently). logit_std: the
    scores' spread (q and k scaled); at 16 in bf16, Delta from the rounded O gave dq / dk 2.7e-2 (an audit)."""
    from ..model.dilated_attention import dilated_attention_reference, dilated_offsets
    from . import dilated_attention_triton as dat

    gen = torch.Generator().manual_seed(seed if seed is not None else int(time.time_ns() % (2 ** 31)))
    q, k, v, do = (torch.randn(B, H, N, Dh, generator=gen) for _ in range(4))
    q, k = q * logit_std ** 0.5, k * logit_std ** 0.5  # q . k / sqrt(Dh) has std logit_std
    seg = _random_segments(B, N, gen) if segments else None
    offsets = dilated_offsets(N, local_width)
    xs = [t.to(device=device, dtype=dtype).requires_grad_() for t in (q, k, v)]
    do_d = do.to(device=device, dtype=dtype)
    old = dict(dat._CONFIG)
    cfg = {"store_ds": store_ds}
    if prefetch is not None:
        cfg.update({k: tuple(old[k][:2]) + (prefetch,) for k in ("fwd", "dkdv", "dq")})
    dat.set_attention_config(**cfg)
    dlse = torch.randn(B, H, N, generator=gen).to(device) if with_lse else None
    seg_d = seg.to(device) if seg is not None else None
    try:
        out = dat.dilated_attention_triton(*xs, offsets, seg_d, return_lse=with_lse)
        grads = torch.autograd.grad(out, xs, (do_d, dlse) if with_lse else do_d)
    finally:
        dat.set_attention_config(**old)
    refs_in = [x.detach().float().requires_grad_() for x in xs]
    ref = dilated_attention_reference(*refs_in, offsets, seg_d, return_lse=with_lse)
    ref_grads = torch.autograd.grad(ref, refs_in, (do_d.float(), dlse) if with_lse else do_d.float())
    if with_lse:
        (out, lse), (ref, ref_lse) = out, ref
    errs = {"out": rel_err(out, ref), **({"lse": rel_err(lse, ref_lse)} if with_lse else {})}
    errs.update({f"d{n}": rel_err(g, r) for n, g, r in zip("qkv", grads, ref_grads)})
    return errs


def check_scan(device: str, dtype: torch.dtype, B: int, T: int, D: int, with_h0: bool = False,
               n_chunks: int = 0, seed: int | None = None, config: dict | None = None) -> dict:
    """The IntegralLNN scan kernel (fwd + all gradients) against the chunked reference in fp64. config: other
    scan_triton settings for this check (e.g. fold, carry_group)."""
    from ..model.scan import scan_const_decay
    from . import scan_triton as st

    gen = torch.Generator().manual_seed(seed if seed is not None else int(time.time_ns() % (2 ** 31)))
    u, dy = torch.randn(B, T, D, generator=gen), torch.randn(B, T, D, generator=gen)
    # decays from fast (a = 0.05) to slow (a = 0.998): time constants of ~1 to ~500 steps
    log_a = -torch.exp(torch.empty(D).uniform_(math.log(2e-3), math.log(3.0), generator=gen))
    h0 = torch.randn(B, D, generator=gen) if with_h0 else None
    u_d = u.to(device=device, dtype=dtype).requires_grad_()
    la_d = log_a.to(device).requires_grad_()
    h0_d = h0.to(device).requires_grad_() if with_h0 else None
    old = st.set_scan_config(**{"n_chunks": n_chunks, **(config or {})})
    try:
        h = st.scan_const_decay_triton(u_d, la_d, h0_d)
        ins = [u_d, la_d] + ([h0_d] if with_h0 else [])
        grads = torch.autograd.grad(h, ins, dy.to(device=device, dtype=dtype))
    finally:
        st.set_scan_config(**old)
    r_ins = [x.detach().double().requires_grad_() for x in ins]
    ref = scan_const_decay(r_ins[0], r_ins[1], r_ins[2] if with_h0 else None)
    ref_grads = torch.autograd.grad(ref, r_ins, dy.to(device).double())
    errs = {"out": rel_err(h, ref)}
    errs.update({f"d{n}": rel_err(g, r) for n, g, r in zip(["u", "log_a", "h0"], grads, ref_grads)})
    return errs


def check_ssd_scan(device: str, dtype: torch.dtype, B: int, T: int, H: int, P: int = 16, N: int = 16, chunk: int = 64,
                   with_h0: bool = False, compiled: bool = False, split: int | None = None, resets: int = 0,
                   seed: int | None = None) -> dict:
    """The Mamba-2 scan's forward-only kernel (ssd_triton.py, through the dispatcher with no gradient) against
    ssd_chunked in fp64 on the same rounded inputs: y and the final state. Decays as the model's (dt in
    [1e-3, 0.1], A in [1, 16]); compiled: inside torch.compile(fullgraph=True), as a compiled stage A calls it;
    split: ssd_triton's form (0 sequential, 1 chunk-parallel, 2 auto; None = the default); resets: that many
    steps with log_a -1e4 (a learned reset: differences of long prefix sums lost 1e-4 of the later decays)."""
    from ..model.ssm import ssd_chunked
    from . import forced_routing, ssd_scan
    from . import ssd_triton as st

    gen = torch.Generator().manual_seed(seed if seed is not None else int(time.time_ns() % (2 ** 31)))
    dt = torch.exp(torch.empty(B, T, H).uniform_(math.log(1e-3), math.log(0.1), generator=gen))
    log_a = -dt * torch.empty(H).uniform_(1, 16, generator=gen)
    log_a[:, torch.randperm(T, generator=gen)[:resets]] = -1e4
    x = torch.randn(B, T, H, P, generator=gen) * dt[..., None]
    Bm, Cm = torch.randn(B, T, N, generator=gen), torch.randn(B, T, N, generator=gen)
    h0 = torch.randn(B, H, P, N, generator=gen) if with_h0 else None
    ins = [x.to(device=device, dtype=dtype), log_a.to(device), Bm.to(device=device, dtype=dtype),
           Cm.to(device=device, dtype=dtype), h0.to(device) if with_h0 else None]
    fn = torch.compile(ssd_scan, fullgraph=True, dynamic=False) if compiled else ssd_scan
    old = st.set_ssd_config(**({} if split is None else {"split": split}))
    try:
        with torch.no_grad(), forced_routing(True):
            y, state = fn(*ins[:4], chunk, ins[4])
    finally:
        st.set_ssd_config(**old)
    ref_y, ref_state = ssd_chunked(*[t.double() if t is not None else None for t in ins[:4]], chunk,
                                   ins[4].double() if with_h0 else None)
    return {"y": rel_err(y, ref_y), "state": rel_err(state, ref_state),
            "dtypes": 0.0 if (y.dtype, state.dtype) == (dtype, torch.float32) else float("inf")}


def _conv_gate_inputs(B: int, T: int, D: int, k: int, gen: torch.Generator):
    """x as the first 2D columns of a wider (B, T, 3D) tensor (the in_proj output in the model: strided
    rows), weight (2D, k), bias (2D,)."""
    xw = torch.randn(B, T, 3 * D, generator=gen)
    w = torch.randn(2 * D, k, generator=gen) / math.sqrt(k)
    b = torch.randn(2 * D, generator=gen) * 0.5
    return xw, w, b


def check_conv_gate(device: str, dtype: torch.dtype, B: int, T: int, D: int, k: int = 4,
                    rows_per_prog: int | None = None, min_programs: int | None = None,
                    dgc_fp32: int | None = None, wgrad: int | None = None, seed: int | None = None) -> dict:
    """dgc_fp32: the backward's dGC intermediate in fp32 (1) or x's dtype (0); wgrad: pass A's weight-gradient
    variant (bwd_wgrad: 0 per-tile reductions, 1 deferred); None = the default."""
    from ..model.conv import causal_conv_gate_reference
    from . import conv_gate_triton as cg

    gen = torch.Generator().manual_seed(seed if seed is not None else int(time.time_ns() % (2 ** 31)))
    xw, w, b = _conv_gate_inputs(B, T, D, k, gen)
    du = torch.randn(B, T, D, generator=gen)
    ins = [t.to(device=device, dtype=dtype).requires_grad_() for t in (xw, w, b)]
    old = cg.set_conv_gate_config(**{key: val for key, val in (
        ("rows_per_prog", rows_per_prog), ("min_programs", min_programs), ("bwd_dgc_fp32", dgc_fp32),
        ("bwd_wgrad", wgrad))
        if val is not None})
    try:
        u = cg.conv_gate_triton(ins[0][..., :2 * D], ins[1], ins[2])
        grads = torch.autograd.grad(u, ins, du.to(device=device, dtype=dtype))
    finally:
        cg.set_conv_gate_config(**old)
    r_ins = [x.detach().double().requires_grad_() for x in ins]
    ref = causal_conv_gate_reference(r_ins[0][..., :2 * D], r_ins[1], r_ins[2])
    ref_grads = torch.autograd.grad(ref, r_ins, du.to(device).double())
    errs = {"out": rel_err(u, ref), "dx": rel_err(grads[0][..., :2 * D], ref_grads[0][..., :2 * D])}
    errs["dx_untouched"] = grads[0][..., 2 * D:].abs().max().item()  # the columns the op does not read: 0
    errs.update({f"d{n}": rel_err(g, r) for n, g, r in zip(["w", "b"], grads[1:], ref_grads[1:])})
    return errs


def check_compiled(device: str, dtype: torch.dtype, B: int, H: int, N: int, Dh: int, T: int, D: int,
                   local_width: int = 3, seed: int | None = None) -> dict:
    """The kernels through the model-facing dispatchers inside torch.compile(fullgraph=True), the scan fed by
    the conv gate as in IntegralLNNBlock: the custom ops must trace as single nodes (no graph break; fake
    shapes and dtypes right) and give the eager reference's values and gradients. aot_eager: the ops run as
    they would under Inductor, without Inductor compiling the surrounding code (slow under the interpreter)."""
    import ionllama.kernels as K

    from ..model.conv import causal_conv_gate_reference
    from ..model.dilated_attention import dilated_attention_reference, dilated_offsets
    from ..model.scan import scan_const_decay

    gen = torch.Generator().manual_seed(seed if seed is not None else int(time.time_ns() % (2 ** 31)))
    q, k, v = (torch.randn(B, H, N, Dh, generator=gen) for _ in range(3))
    xw, w, b = _conv_gate_inputs(B, T, D, 4, gen)
    log_a = -torch.exp(torch.empty(D).uniform_(math.log(2e-3), math.log(3.0), generator=gen))
    h0 = torch.randn(B, D, generator=gen)
    ins = [t.to(device=device, dtype=dtype).requires_grad_() for t in (q, k, v, xw, w, b)]
    ins += [log_a.to(device).requires_grad_(), h0.to(device).requires_grad_()]

    def f(q, k, v, xw, w, b, log_a, h0):
        u = K.causal_conv_gate(xw[..., :2 * D], w, b)
        return K.dilated_attention_local(q, k, v, local_width), K.scan_const_decay(u, log_a, h0)

    routing = K.forced_routing(True) if device == "cpu" else contextlib.nullcontext()  # CPU: interpreted kernels
    try:
        with routing:
            torch._dynamo.reset()
            o, h = torch.compile(f, backend="aot_eager", fullgraph=True)(*ins)
        g_o, g_h = torch.randn(o.shape, generator=gen), torch.randn(h.shape, generator=gen)
        grads = torch.autograd.grad((o, h), ins, (g_o.to(device, dtype), g_h.to(device, dtype)))
    finally:
        torch._dynamo.reset()
    r_ins = [x.detach().double().requires_grad_() for x in ins]
    ref_o = dilated_attention_reference(*r_ins[:3], dilated_offsets(N, local_width))
    ref_h = scan_const_decay(causal_conv_gate_reference(r_ins[3][..., :2 * D], r_ins[4], r_ins[5]), *r_ins[6:])
    ref_grads = torch.autograd.grad((ref_o, ref_h), r_ins, (g_o.to(device).double(), g_h.to(device).double()))
    errs = {"out": rel_err(o, ref_o), "h": rel_err(h, ref_h)}
    grads = list(grads)
    grads[3], ref_grads = grads[3][..., :2 * D], list(ref_grads)
    ref_grads[3] = ref_grads[3][..., :2 * D]
    errs.update({f"d{n}": rel_err(g, r)
                 for n, g, r in zip(["q", "k", "v", "x", "w", "b", "log_a", "h0"], grads, ref_grads)})
    return errs


BLOCK_PARAMS = ("decay_logit", "norm1.weight", "in_proj.weight", "conv.weight", "conv.bias", "state_norm.weight",
                "out_proj.weight", "norm2.weight", "ffn.w_in.weight", "ffn.w_out.weight")


def check_block(device: str, dtype: torch.dtype, B: int, T: int, D: int, seed: int | None = None) -> dict:
    """IntegralLNNBlock routed through the custom ops vs the same block in fp64 through the references: the
    output and the gradients of the input and of every parameter (the conv gate's weight arrives through
    weight[:, 0] and a dtype cast). Parameters and input in fp32; bf16/fp16 run under autocast as in training,
    but then the block's matmuls dominate the error (~1e-2 on CPU), so the cases use fp32."""
    import copy

    import ionllama.kernels as K

    from ..model.common import swiglu_hidden
    from ..model.integral_lnn import IntegralLNNBlock

    gen = torch.Generator().manual_seed(seed if seed is not None else int(time.time_ns() % (2 ** 31)))
    blk = IntegralLNNBlock(D, swiglu_hidden(D))
    with torch.no_grad():
        for name, p in blk.named_parameters():  # random (the default conv bias is zero, norm weights one), but
            if name != "decay_logit":  # the decays keep their init: time constants of 2..256 steps
                p.copy_(torch.randn(p.shape, generator=gen) * (0.5 if p.dim() < 2 else 1.0 / math.sqrt(p.shape[-1])))
    ref_blk = copy.deepcopy(blk).to(device=device, dtype=torch.float64)
    blk = blk.to(device)
    x, dy = torch.randn(B, T, D, generator=gen), torch.randn(B, T, D, generator=gen)
    xd = x.to(device).requires_grad_()
    amp = torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32)
    with K.forced_routing(True), amp:
        y = blk(xd)
    grads = torch.autograd.grad(y, [xd] + [p for _, p in blk.named_parameters()], dy.to(device, y.dtype))
    xr = x.to(device, torch.float64).requires_grad_()
    with K.forced_routing(False):
        y_ref = ref_blk(xr)
    ref_grads = torch.autograd.grad(y_ref, [xr] + [p for _, p in ref_blk.named_parameters()], dy.to(device).double())
    names = ["x"] + [n for n, _ in blk.named_parameters()]
    assert tuple(names[1:]) == BLOCK_PARAMS, names
    errs = {"out": rel_err(y, y_ref)}
    errs.update({f"d{n}": rel_err(g, r) for n, g, r in zip(names, grads, ref_grads)})
    return errs


def check_rope(device: str, dtype: torch.dtype, B: int, N: int, dim: int, n_heads: int, n_layers: int = 2,
               seed: int | None = None) -> dict:
    """The shared RoPE table: the op's cos/sin vs rope_cos_sin on the same device, and a compiled latent
    transformer (dense attention, so only the table's routing differs; Inductor on CUDA, aot_eager on CPU)
    reading the table vs the same stack in fp64, eager, computing cos/sin per layer: output, input gradient
    and the worst parameter gradient."""
    import copy

    import ionllama.kernels as K

    from ..model.common import rope_cos_sin
    from ..model.latent_transformer import LatentTransformer

    gen = torch.Generator().manual_seed(seed if seed is not None else int(time.time_ns() % (2 ** 31)))
    pos = torch.arange(N, device=device)
    with K.forced_routing(True):
        cos, sin = K.rope_cos_sin_table(pos, dim // n_heads, 10000.0)
    ref_cos, ref_sin = rope_cos_sin(pos, dim // n_heads)
    errs = {"cos": rel_err(cos, ref_cos), "sin": rel_err(sin, ref_sin)}
    torch.manual_seed(int(torch.randint(0, 2 ** 31, (1,), generator=gen)))
    lt = LatentTransformer(dim, n_layers, n_heads, attention="dense")
    ref_lt = copy.deepcopy(lt).to(device=device, dtype=torch.float64)
    lt = lt.to(device)
    z, dy = torch.randn(B, N, dim, generator=gen), torch.randn(B, N, dim, generator=gen)
    zd = z.to(device).requires_grad_()
    amp = torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32)
    try:
        torch._dynamo.reset()
        with K.forced_routing(True), amp:
            y = torch.compile(lt, backend="inductor" if device == "cuda" else "aot_eager", fullgraph=True)(zd)
        grads = torch.autograd.grad(y, [zd] + list(lt.parameters()), dy.to(device, y.dtype))
    finally:
        torch._dynamo.reset()
    zr = z.to(device, torch.float64).requires_grad_()
    with K.forced_routing(False):
        y_ref = ref_lt(zr)
    ref_grads = torch.autograd.grad(y_ref, [zr] + list(ref_lt.parameters()), dy.to(device).double())
    errs.update({"out": rel_err(y, y_ref), "dz": rel_err(grads[0], ref_grads[0]),
                 "dparams_worst": max(rel_err(g, r) for g, r in zip(grads[1:], ref_grads[1:]))})
    return errs


def _randomize_lnn_block(blk, gen: torch.Generator):
    """Random weights for an IntegralLNNBlock, at a scale where every part moves its output (conv bias and
    norm weights too: 1 + noise); the decays keep their init (time constants of 2..256 steps)."""
    with torch.no_grad():
        for name, p in blk.named_parameters():
            if name != "decay_logit":
                p.copy_(torch.randn(p.shape, generator=gen) * (0.5 if p.dim() < 2 else 1.0 / math.sqrt(p.shape[-1])))
            if name in ("norm1.weight", "state_norm.weight", "norm2.weight"):
                p.add_(1.0)
    return blk


def _random_lnn_block(D: int, conv_kernel: int, gen: torch.Generator):
    """IntegralLNNBlock(D, swiglu_hidden(D), conv_kernel) with random weights (_randomize_lnn_block)."""
    from ..model.common import swiglu_hidden
    from ..model.integral_lnn import IntegralLNNBlock

    return _randomize_lnn_block(IntegralLNNBlock(D, swiglu_hidden(D), conv_kernel), gen).eval()


def check_lnn_step(device: str, dtype: torch.dtype, B: int, D: int, steps: int = 7, conv_kernel: int = 4,
                   compiled: bool = False, seed: int | None = None) -> dict:
    """The fused IntegralLNN decode step (lnn_step_triton, through IntegralState(fused=True)) vs IntegralState.step
    on the same block in the same dtype: `steps` consecutive steps from a random state (h, ring) at random
    per-row positions t (the ring of kernel - 1 slots wraps around), each path carrying its own state. Errors:
    the worst over the steps of the block output, h and the ring buffer. compiled: the fused step inside
    torch.compile(fullgraph=True) (Inductor): the op must trace as one node that writes h and the ring in place
    ("state_not_in_place": 1 unless the generated code passes the input buffers themselves)."""
    from ..generation.local_state import IntegralState

    gen = torch.Generator().manual_seed(seed if seed is not None else int(time.time_ns() % (2 ** 31)))
    blk = _random_lnn_block(D, conv_kernel, gen).to(device=device, dtype=dtype)
    ref, fused = IntegralState(blk, B, device, dtype), IntegralState(blk, B, device, dtype, fused=True)
    h0 = torch.randn(B, D, generator=gen)
    ring0 = torch.randn(B, conv_kernel - 1, 2 * D, generator=gen)
    for st in (ref, fused):
        st.cache["h"].copy_(h0)
        st.cache["conv"].copy_(ring0)
    t = torch.randint(0, 10, (B,), generator=gen).to(device)
    h_ptr, ring_ptr = fused.cache["h"].data_ptr(), fused.cache["conv"].data_ptr()
    step = fused.step
    errs = {"out": 0.0, "h": 0.0, "ring": 0.0}
    if compiled:
        from torch._inductor.utils import run_and_get_code

        torch._dynamo.reset()
        compiled_step = torch.compile(fused.step, fullgraph=True)
        codes = []

        def step(x, t):
            if codes:
                return compiled_step(x, t)
            y, code = run_and_get_code(compiled_step, x, t)
            codes.extend(code)
            return y
    try:
        with torch.no_grad():
            for _ in range(steps):
                x = torch.randn(B, D, generator=gen).to(device, dtype)
                y_ref, y = ref.step(x, t), step(x, t)
                errs["out"] = max(errs["out"], rel_err(y, y_ref))
                errs["h"] = max(errs["h"], rel_err(fused.cache["h"], ref.cache["h"]))
                errs["ring"] = max(errs["ring"], rel_err(fused.cache["conv"], ref.cache["conv"]))
                t = t + 1
    finally:
        if compiled:
            torch._dynamo.reset()
    # the state tensors were updated in place (a CUDA graph replays into them): same storage as before
    errs["state_moved"] = float(fused.cache["h"].data_ptr() != h_ptr or fused.cache["conv"].data_ptr() != ring_ptr)
    if compiled:  # the compiled code hands the op the graph's input buffers as h and the ring (no temporaries
        # to copy back): "args" in Inductor's wrapper code
        calls = re.findall(r"lnn_block_step\.default\((\w+), (\w+), (\w+),", "\n".join(codes))
        errs["state_not_in_place"] = float(len(calls) != 1 or not all(a.startswith("arg") for a in calls[0][1:]))
    return errs


def _random_latent_model(gen: torch.Generator, **kw):
    """A tiny ionLlama (entropy patching, IntegralLNN local layers) whose latent path (to_latent, the latent
    blocks and final norm, from_latent) has random weights at a scale where every part moves its output (norm
    weights 1 + noise, matrices at 1/sqrt(fan-in)): at init the latent context barely moves the logits."""
    from .. import create_model

    torch.manual_seed(int(torch.randint(0, 2 ** 31, (1,), generator=gen)))
    cfg = dict(d_model=32, n_layers=2, n_heads=2, d_local=32, n_enc_layers=1, n_dec_layers=1, d_entropy=16,
               n_entropy_layers=1, entropy_headdim=8, entropy_state=4, ngram_buckets=64, max_patch_size=5)
    m = create_model("tiny", **{**cfg, **kw}).eval()
    with torch.no_grad():
        for mod in (m.to_latent, m.latent, m.from_latent):
            for p in mod.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if p.dim() < 2 else 1.0 / math.sqrt(p.shape[-1])))
                if p.dim() < 2:
                    p.add_(1.0)
    return m


def _latent_blocks(block_n: int | None, old: dict | None = None) -> dict | None:
    """Set every GEMV channel block of the fused latent step to block_n (None: leave them); old: restore it."""
    if old is not None:
        from . import latent_step_triton as lt
        lt.set_latent_step_config(**old)
        return None
    if block_n is None:
        return None
    from . import latent_step_triton as lt
    return lt.set_latent_step_config(**{k: block_n for k in ("qkv_block_j", "proj_block_n", "up_block_n",
                                                              "down_block_n")})


def check_latent_generate(device: str, dtype: torch.dtype, attention: str = "dilated", n_new: int = 16,
                          n_layers: int = 2, block_n: int | None = None, seed: int | None = None) -> dict:
    """Greedy generation of a tiny ionLlama (random latent weights, entropy patching at the median entropy: patches
    of varying length, latent steps happen) with the fused latent step vs without: the fraction of differing
    bytes. On CUDA the fused run replays CUDA graphs."""
    from ..generation import generate

    gen = torch.Generator().manual_seed(seed if seed is not None else int(time.time_ns() % (2 ** 31)))
    m = _random_latent_model(gen, attention=attention, local_width=2, n_layers=n_layers)
    with torch.no_grad():
        ent = m.entropy_model(torch.randint(0, 256, (2, 64), generator=gen))["entropy"].flatten()
        m.entropy_threshold.fill_(float(ent.median()))
    m = m.to(device=device, dtype=dtype)
    prompts = [b"abc de", b"xy"]
    ref = generate(m, prompts, n_new, greedy=True, cuda_graphs=False)
    old = _latent_blocks(block_n)
    try:
        out = generate(m, prompts, n_new, greedy=True, cuda_graphs=device == "cuda", fused_latent_step=True)
    finally:
        _latent_blocks(None, old)
    n = sum(max(len(a), len(b)) for a, b in zip(out, ref))
    diff = sum(sum(x != y for x, y in zip(a, b)) + abs(len(a) - len(b)) for a, b in zip(out, ref))
    return {"bytes_differ": diff / max(n, 1)}


def check_latent_step(device: str, dtype: torch.dtype, B: int, D: int, H: int, n_layers: int = 2, steps: int = 5,
                      attention: str = "dilated", local_width: int = 3, max_len: int = 40, compiled: bool = False,
                      block_n: int | None = None, seed: int | None = None) -> dict:
    """The fused latent step (latent_step_triton, IonLlamaDecoder(fused_latent_step=True)) vs advance_latent's
    PyTorch path on the same random-weight model in the same dtype: `steps` latent steps from random caches (every
    slot filled) and random per-row patch counts, each with a random commit mask (some rows do not commit: they
    recompute their slot next step), each path carrying its own state. Errors: the worst over the steps of the
    latent context (ctx, the output latent after the final norm and from_latent, committed rows), the k and v
    caches (every layer and slot), and whether the patch counts differ. compiled: the fused advance_latent inside
    torch.compile(fullgraph=True) (Inductor): every call of the op must take the caches themselves
    ("caches_not_in_place": 1 unless the generated code passes the input buffers). block_n: every GEMV kernel's
    channel block (fewer programs: the interpreter's cost is per program)."""
    from ..generation.ionllama_decoder import IonLlamaDecoder

    gen = torch.Generator().manual_seed(seed if seed is not None else int(time.time_ns() % (2 ** 31)))
    m = _random_latent_model(gen, d_model=D, n_layers=n_layers, n_heads=H, attention=attention,
                             local_width=local_width).to(device=device, dtype=dtype)
    ref, fused = IonLlamaDecoder(m, B, max_len), IonLlamaDecoder(m, B, max_len, fused_latent_step=True)
    lk0, lv0 = torch.randn(ref.lk.shape, generator=gen), torch.randn(ref.lv.shape, generator=gen)
    n0 = torch.randint(0, max_len - steps, (B,), generator=gen)
    for dec in (ref, fused):
        dec.lk.copy_(lk0)
        dec.lv.copy_(lv0)
        dec.n_complete.copy_(n0)
        dec.acc_den.fill_(1.0)
    ptrs = (fused.lk.data_ptr(), fused.lv.data_ptr())
    step = fused.advance_latent
    errs = {"ctx": 0.0, "k": 0.0, "v": 0.0, "n_complete": 0.0}
    old = _latent_blocks(block_n)
    if compiled:
        from torch._inductor.utils import run_and_get_code

        torch._dynamo.reset()
        compiled_step = torch.compile(fused.advance_latent, fullgraph=True)
        codes = []

        def step(mask):
            if codes:
                return compiled_step(mask)
            _, code = run_and_get_code(compiled_step, mask)
            codes.extend(code)
    try:
        with torch.no_grad():
            for s in range(steps):
                pooled = torch.randn(B, 32, generator=gen).to(device)
                mask = (torch.rand(B, generator=gen) < 0.6).to(device)
                mask[s % B] = True  # at least one row commits
                for dec in (ref, fused):
                    dec.acc_num.copy_(pooled)
                ref.advance_latent(mask)
                step(mask)
                errs["ctx"] = max(errs["ctx"], rel_err(fused.ctx, ref.ctx))
                errs["k"] = max(errs["k"], rel_err(fused.lk, ref.lk))
                errs["v"] = max(errs["v"], rel_err(fused.lv, ref.lv))
                errs["n_complete"] = max(errs["n_complete"], float(not torch.equal(fused.n_complete, ref.n_complete)))
    finally:
        _latent_blocks(None, old)
        if compiled:
            torch._dynamo.reset()
    errs["caches_moved"] = float((fused.lk.data_ptr(), fused.lv.data_ptr()) != ptrs)
    if compiled:  # the generated code hands every call of the op the graph's input buffers as the caches
        calls = re.findall(r"latent_block_step\.default\((\w+), (\w+), (\w+),", "\n".join(codes))
        errs["caches_not_in_place"] = float(len(calls) != n_layers
                                            or not all(a.startswith("arg") for c in calls for a in c[1:]))
    return errs


def check_byte_head(device: str, dtype: torch.dtype, B: int, D: int, V: int = 256, block_n: int = 32,
                    seed: int | None = None) -> dict:
    """The decoder's fused head (lnn_step_triton.byte_head_step: RMSNorm + bias-free Linear in one kernel) vs
    head(norm(h)) in the same dtype on random inputs and weights. Errors: the logits; and "compiled", the op inside
    torch.compile(fullgraph=True) against the eager op (the same kernel: 0 unless tracing or the fake op breaks)."""
    from ..model.common import RMSNorm
    from . import lnn_step_triton as ls

    gen = torch.Generator().manual_seed(seed if seed is not None else int(time.time_ns() % (2 ** 31)))
    norm, head = RMSNorm(D), torch.nn.Linear(D, V, bias=False)
    with torch.no_grad():
        norm.weight.copy_(1.0 + 0.3 * torch.randn(D, generator=gen))
        head.weight.copy_(torch.randn(V, D, generator=gen) / D ** 0.5)
    norm, head = norm.to(device=device, dtype=dtype), head.to(device=device, dtype=dtype)
    h = (2.0 * torch.randn(B, D, generator=gen)).to(device=device, dtype=dtype)
    ls.check_byte_head(norm, head, dtype)
    old = ls.set_lnn_step_config(head_block_n=block_n)
    try:
        with torch.no_grad():
            ref = head(norm(h))
            out = ls.byte_head_step(norm, head, h)
            torch._dynamo.reset()
            comp = torch.compile(lambda x: ls.byte_head_step(norm, head, x), fullgraph=True)(h)
    finally:
        ls.set_lnn_step_config(**old)
    return {"logits": rel_err(out, ref), "compiled": rel_err(comp, out)}


def check_embed_step(device: str, dtype: torch.dtype, B: int, D: int, sizes=(2, 3, 4, 5), buckets: int = 64,
                     mode: str = "hash", steps: int = 7, seed: int | None = None) -> dict:
    """The decoder's hashed n-gram embedding as one kernel (embed_step_triton.embed_step) vs the PyTorch step
    (ionllama_decoder.hashed_embed_step), over `steps` bytes from an empty ring (more than the ring's width: slots are
    reused), half the bytes digits or near them, rows at different positions. Errors: the embeddings; "ring", 1 if
    the rings ever differ; "compiled", the op inside torch.compile(fullgraph=True) against the eager op (its outputs
    and ring); "opcheck", 1 if torch.library.opcheck finds the op's schema (the ring it mutates) or fake wrong."""
    from ..generation.ionllama_decoder import hashed_embed_step
    from ..generation.slots import SlotWriter
    from ..model.byte_embedding import _PAD, ByteEmbedding, LastNgramHasher
    from . import embed_step_triton as es

    gen = torch.Generator().manual_seed(seed if seed is not None else int(time.time_ns() % (2 ** 31)))
    emb = ByteEmbedding(D, ngram=mode, ngram_sizes=sizes, buckets=buckets)
    with torch.no_grad():
        for p in emb.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    emb = emb.to(device=device, dtype=dtype)
    K = max(max(sizes) - 1, 1)
    hasher = LastNgramHasher(sizes, buckets, K + 1, device)
    ring_ref = torch.full((B, K), _PAD, dtype=torch.long, device=device)
    ring, ring_c = ring_ref.clone(), ring_ref.clone()
    es.check_embed_step(emb, ring, dtype)
    slots = SlotWriter(B, 1, device)
    torch._dynamo.reset()
    comp = torch.compile(lambda r, x, t: es.embed_step(emb, hasher, r, x, t), fullgraph=True)
    errs = {"e": 0.0, "ring": 0.0, "compiled": 0.0, "opcheck": 0.0}
    args = (torch.arange(B, device=device) + 48, torch.arange(B, device=device), ring_ref.clone(), hasher.coef,
            hasher.n, emb.bytes.weight, [tb.weight for tb in emb.tables], buckets, mode == "hash_nodigit")
    try:  # (a ring mutated but not declared so: nothing in the compiled lambda below reads it after the op)
        torch.library.opcheck(es.embed_step_op, args, test_utils=("test_schema", "test_faketensor"))
    except Exception as e:  # noqa: BLE001 (the row fails, the message goes to the log)
        print(f"embed_step opcheck: {e}", file=sys.stderr)
        errs["opcheck"] = 1.0
    with torch.no_grad():
        for step in range(steps):
            x = torch.randint(0, 256, (B,), generator=gen)
            x[::2] = torch.randint(44, 62, (len(x[::2]),), generator=gen)  # digits (48-57) and their neighbours
            x, t = x.to(device), (step + torch.arange(B)).to(device)
            ref = hashed_embed_step(emb, hasher, slots, ring_ref, x, t)
            out = es.embed_step(emb, hasher, ring, x, t)
            out_c = comp(ring_c, x, t)
            errs["e"] = max(errs["e"], rel_err(out, ref))
            errs["ring"] = max(errs["ring"], float(not torch.equal(ring, ring_ref)))
            errs["compiled"] = max(errs["compiled"], rel_err(out_c, out), float(not torch.equal(ring_c, ring)))
    return errs


def check_lnn_generate(device: str, dtype: torch.dtype, n_new: int = 16, block_n: int | None = None,
                       head: bool = False, embed: bool = False, seed: int | None = None) -> dict:
    """Greedy generation of a tiny ionLlama (IntegralLNN local layers, entropy patching) with the fused local
    step vs without: the fraction of differing bytes. On CUDA the fused run replays CUDA graphs. block_n: every
    kernel's channel block (fewer programs: the interpreter's cost is per program). head: the fused run's decoder
    head as one kernel too (head_block_n: block_n, or 32), else the PyTorch head. embed: its hashed n-gram
    embedding as one kernel too (embed_step_triton). The reference never takes a fused kernel."""
    from .. import create_model
    from ..generation import generate
    from . import embed_step_triton as es
    from . import lnn_step_triton as ls

    gen = torch.Generator().manual_seed(seed if seed is not None else int(time.time_ns() % (2 ** 31)))
    torch.manual_seed(int(torch.randint(0, 2 ** 31, (1,), generator=gen)))
    m = create_model("tiny", d_model=32, n_layers=2, n_heads=2, d_local=32, n_enc_layers=1, n_dec_layers=2,
                     d_entropy=16, n_entropy_layers=1, entropy_headdim=8, entropy_state=4, ngram_buckets=64,
                     max_patch_size=5, local_width=2).eval()
    for blk in list(m.encoder) + list(m.decoder):  # at init the blocks barely move the logits: an error in
        _randomize_lnn_block(blk, gen)  # the fused step would not change the greedy bytes
    with torch.no_grad():
        ent = m.entropy_model(torch.randint(0, 256, (2, 64), generator=gen))["entropy"].flatten()
        m.entropy_threshold.fill_(float(ent.median()))  # patches of varying length: latent steps happen
    m = m.to(device=device, dtype=dtype)
    prompts = [b"abc de", "a longer prompt. ab\n"]
    ref = generate(m, prompts, n_new, greedy=True, cuda_graphs=False, fused_local_step=False, fused_entropy_step=False,
                   fused_latent_step=False)
    kw = {} if block_n is None else dict.fromkeys(("in_block_n", "out_block_n", "up_block_n", "down_block_n"),
                                                  block_n)
    kw["head_block_n"] = (block_n or 32) if head else 0
    old, old_embed = ls.set_lnn_step_config(**kw), es.set_embed_step_config(enabled=int(embed))
    try:
        out = generate(m, prompts, n_new, greedy=True, cuda_graphs=device == "cuda", fused_local_step=True)
    finally:
        ls.set_lnn_step_config(**old)
        es.set_embed_step_config(**old_embed)
    n = sum(max(len(a), len(b)) for a, b in zip(out, ref))
    diff = sum(sum(x != y for x, y in zip(a, b)) + abs(len(a) - len(b)) for a, b in zip(out, ref))
    return {"bytes_differ": diff / max(n, 1)}


def _random_mamba_block(D: int, d_state: int, headdim: int, conv_kernel: int, gen: torch.Generator):
    """MambaBlock(D, ...) with random weights at a scale where every part moves its output (conv bias, D skip,
    norm weights 1 + noise); dt_bias and A_log keep their init (dt 1e-3..0.1 before the input's share, A 1..16)."""
    from ..model.ssm import MambaBlock

    blk = MambaBlock(D, d_state=d_state, headdim=headdim, conv_kernel=conv_kernel)
    with torch.no_grad():
        for name, p in blk.named_parameters():
            if name.endswith(("dt_bias", "A_log")):
                continue
            p.copy_(torch.randn(p.shape, generator=gen) * (0.5 if p.dim() < 2 else 1.0 / math.sqrt(p.shape[-1])))
            if name.endswith("norm.weight"):
                p.add_(1.0)
    return blk.eval()


def check_ssm_step(device: str, dtype: torch.dtype, B: int, D: int, d_state: int = 16, headdim: int = 16,
                   steps: int = 7, conv_kernel: int = 4, gather: bool = False, compiled: bool = False,
                   block_c: int | None = None, seed: int | None = None) -> dict:
    """The fused entropy-model block step (ssm_step_triton, through local_state.MambaState(fused=True)) vs
    MambaState.step (Mamba2Mixer.step_from_proj with the ring conv) on the same block in the same dtype: `steps`
    consecutive steps from a random state (SSM state, ring) at random per-row positions t (the ring of kernel - 1
    slots wraps around), each path carrying its own state. gather: block 0's form (the embedding row and the
    in_proj table row of a random byte; step_tokens). Also the fused head + entropy (entropy_head_step) vs
    _entropy_bits_step on the reference block output through a random norm and head ("ent"). Errors: the worst
    over the steps of the block output, the SSM state, the ring and the entropies. compiled: the step and the head
    inside torch.compile(fullgraph=True) (Inductor): each op one node, the block op writing the SSM state and the
    ring in place ("state_not_in_place": 1 unless the generated code passes the input buffers themselves)."""
    from ..generation.ionllama_decoder import _entropy_bits_step
    from ..generation.local_state import MambaState
    from ..model.common import RMSNorm
    from . import ssm_step_triton as ss

    gen = torch.Generator().manual_seed(seed if seed is not None else int(time.time_ns() % (2 ** 31)))
    blk = _random_mamba_block(D, d_state, headdim, conv_kernel, gen).to(device=device, dtype=dtype)
    ref, fused = MambaState(blk, B, device, dtype), MambaState(blk, B, device, dtype, fused=True)
    ssm0 = torch.randn(ref.cache["ssm"].shape, generator=gen)
    ring0 = torch.randn(ref.cache["conv"].shape, generator=gen)
    for st in (ref, fused):
        st.cache["ssm"].copy_(ssm0)
        st.cache["conv"].copy_(ring0)
    emb = torch.nn.Embedding(256, D)
    norm, head = RMSNorm(D), torch.nn.Linear(D, 256, bias=False)
    with torch.no_grad():
        emb.weight.copy_(torch.randn(256, D, generator=gen))
        norm.weight.copy_(1.0 + 0.3 * torch.randn(D, generator=gen))
        head.weight.copy_(torch.randn(256, D, generator=gen) * 4.0 / math.sqrt(D))  # entropies of ~1..7 bits
        emb, norm, head = (mod.to(device=device, dtype=dtype) for mod in (emb, norm, head))
        table = blk.mixer.in_proj(blk.norm(emb.weight))  # as IonLlamaDecoder.refresh_weights
    t = torch.randint(0, 10, (B,), generator=gen).to(device)
    s_ptr, ring_ptr = fused.cache["ssm"].data_ptr(), fused.cache["conv"].data_ptr()

    def fused_step(x, t):
        y = fused.step_tokens(x, emb, table, t) if gather else fused.step(x, t)
        return y, ss.entropy_head_step(norm, head, y)

    step, codes = fused_step, []
    if compiled:
        from torch._inductor.utils import run_and_get_code

        torch._dynamo.reset()
        compiled_step = torch.compile(fused_step, fullgraph=True)

        def step(x, t):
            if codes:
                return compiled_step(x, t)
            out, code = run_and_get_code(compiled_step, x, t)
            codes.extend(code)
            return out
    old = ss.set_ssm_step_config(**({} if block_c is None else {"scan_block_c": block_c}))
    errs = {"out": 0.0, "ssm": 0.0, "ring": 0.0, "ent": 0.0}
    try:
        with torch.no_grad():
            for _ in range(steps):
                if gather:
                    x = torch.randint(0, 256, (B,), generator=gen).to(device)
                    y_ref = ref.step_tokens(x, emb, table, t)
                else:
                    x = torch.randn(B, D, generator=gen).to(device, dtype)
                    y_ref = ref.step(x, t)
                y, _ = step(x, t)
                errs["out"] = max(errs["out"], rel_err(y, y_ref))
                errs["ssm"] = max(errs["ssm"], rel_err(fused.cache["ssm"], ref.cache["ssm"]))
                errs["ring"] = max(errs["ring"], rel_err(fused.cache["conv"], ref.cache["conv"]))
                ent = ss.entropy_head_step(norm, head, y_ref)  # the head on the same input as the reference
                errs["ent"] = max(errs["ent"], rel_err(ent, _entropy_bits_step(head(norm(y_ref)))))
                t = t + 1
    finally:
        ss.set_ssm_step_config(**old)
        if compiled:
            torch._dynamo.reset()
    # the state tensors were updated in place (a CUDA graph replays into them): same storage as before
    errs["state_moved"] = float(fused.cache["ssm"].data_ptr() != s_ptr or fused.cache["conv"].data_ptr() != ring_ptr)
    if compiled:  # the compiled code hands the op the graph's input buffers as the state and the ring
        code = "\n".join(codes)
        calls = re.findall(r"ssm_block_step\.default\((\w+), (\w+), (\w+),", code)
        heads = re.findall(r"entropy_head_step\.default\(", code)
        errs["state_not_in_place"] = float(len(calls) != 1 or len(heads) != 1
                                           or not all(a.startswith("arg") for a in calls[0][1:]))
    return errs


def check_ssm_generate(device: str, dtype: torch.dtype, n_new: int = 16, block_c: int | None = None,
                       seed: int | None = None) -> dict:
    """Greedy generation of a tiny ionLlama (entropy patching, a 2-block entropy model with random weights, the
    threshold at the median entropy so the patches follow the entropies) with the fused entropy-model step vs
    without: the fraction of differing bytes. On CUDA the fused run replays CUDA graphs."""
    from .. import create_model
    from ..generation import generate
    from . import ssm_step_triton as ss

    gen = torch.Generator().manual_seed(seed if seed is not None else int(time.time_ns() % (2 ** 31)))
    torch.manual_seed(int(torch.randint(0, 2 ** 31, (1,), generator=gen)))
    m = create_model("tiny", d_model=32, n_layers=2, n_heads=2, d_local=32, n_enc_layers=1, n_dec_layers=1,
                     d_entropy=16, n_entropy_layers=2, entropy_headdim=8, entropy_state=4, ngram_buckets=64,
                     max_patch_size=5, local_width=2).eval()
    em = m.entropy_model
    with torch.no_grad():
        for i, blk in enumerate(em.blocks):
            em.blocks[i] = _random_mamba_block(16, 4, 8, m.config.conv_kernel, gen)
        em.head.weight.mul_(100.0)  # entropies spread over a few bits: the blocks' outputs decide the patches
        ent = em(torch.randint(0, 256, (2, 64), generator=gen))["entropy"].flatten()
        m.entropy_threshold.fill_(float(ent.median()))  # patches of varying length: latent steps happen
    m = m.to(device=device, dtype=dtype)
    prompts = [b"abc de", "a longer prompt. ab\n"]
    ref = generate(m, prompts, n_new, greedy=True, cuda_graphs=False, fused_local_step=False)
    old = ss.set_ssm_step_config(**({} if block_c is None else {"scan_block_c": block_c}))
    try:
        out = generate(m, prompts, n_new, greedy=True, cuda_graphs=device == "cuda", fused_local_step=False,
                       fused_entropy_step=True)
    finally:
        ss.set_ssm_step_config(**old)
    n = sum(max(len(a), len(b)) for a, b in zip(out, ref))
    diff = sum(sum(x != y for x, y in zip(a, b)) + abs(len(a) - len(b)) for a, b in zip(out, ref))
    return {"bytes_differ": diff / max(n, 1)}


def cases(large: bool) -> list[tuple]:
    """(kind, dtype name, kwargs). Small shapes for the interpreter; large adds GPU-sized ones."""
    cs = [
        ("attention", "fp32", dict(B=2, H=2, N=37, Dh=32)),
        ("attention", "fp32", dict(B=2, H=2, N=64, Dh=32, segments=True, prefetch=True)),
        ("attention", "fp32", dict(B=1, H=2, N=29, Dh=48, store_ds=False, segments=True)),
        ("attention", "bf16", dict(B=2, H=2, N=53, Dh=64, segments=True, prefetch=False)),
        ("attention", "fp16", dict(B=1, H=1, N=40, Dh=32)),
        ("attention", "bf16", dict(B=2, H=2, N=64, Dh=64, logit_std=16.0)),  # peaked softmax: Delta's precision
        ("attention", "fp32", dict(B=1, H=2, N=45, Dh=32, local_width=16, segments=True)),  # 18 offsets
        ("attention", "fp32", dict(B=2, H=2, N=19, Dh=16)),  # the dispatcher's smallest head dim (tiny: 32 / 2 heads)
        ("attention", "fp32", dict(B=1, H=2, N=1, Dh=16)),  # one position
        ("attention", "fp32", dict(B=2, H=2, N=37, Dh=32, segments=True, with_lse=True)),  # lse's gradient too
        ("attention", "fp32", dict(B=1, H=2, N=29, Dh=48, store_ds=False, with_lse=True)),
        ("scan", "fp32", dict(B=2, T=45, D=24, n_chunks=1)),
        ("scan", "fp32", dict(B=2, T=131, D=16, with_h0=True, n_chunks=3)),
        ("scan", "bf16", dict(B=2, T=77, D=32, with_h0=True)),
        ("scan", "fp32", dict(B=1, T=300, D=16, with_h0=True, n_chunks=2)),  # several tiles per chunk
        ("scan", "fp32", dict(B=1, T=131, D=144, with_h0=True, n_chunks=3)),  # 2 channel blocks, one ragged
        ("scan", "fp32", dict(B=1, T=1, D=16, with_h0=True)),  # one step
        # the entering state folded into each tile's first row (fold 2: in fp32 too, where an error shows);
        # summaries two a load, five chunks (three loads); the default fold in bf16, not folding fp32
        ("scan", "fp32", dict(B=2, T=131, D=24, with_h0=True, n_chunks=5, config=dict(fold=2, carry_group=2))),
        ("scan", "bf16", dict(B=2, T=131, D=24, with_h0=True, n_chunks=5, config=dict(fold=1, carry_group=2))),
        # the backward (two passes): T not a multiple of the tiles, several tiles per program, T < k,
        # k = 7 and k = 1, D not a multiple of the channel tiles, bf16 with the dGC intermediate in bf16 and fp32
        ("conv_gate", "fp32", dict(B=2, T=45, D=24)),
        ("conv_gate", "fp32", dict(B=1, T=300, D=16, rows_per_prog=64, min_programs=1)),  # tiles per program
        ("conv_gate", "fp32", dict(B=2, T=37, D=8, k=7)),
        ("conv_gate", "fp32", dict(B=1, T=20, D=8, k=1)),
        ("conv_gate", "fp32", dict(B=2, T=3, D=8)),  # T < k
        ("conv_gate", "fp32", dict(B=1, T=5, D=8, k=7)),
        ("conv_gate", "fp32", dict(B=1, T=1, D=8)),
        ("conv_gate", "fp32", dict(B=1, T=33, D=72)),  # 2D = 144 > dx_block_c
        ("conv_gate", "bf16", dict(B=2, T=77, D=32)),
        ("conv_gate", "bf16", dict(B=2, T=50, D=16, dgc_fp32=0)),
        ("conv_gate", "fp32", dict(B=1, T=300, D=16, rows_per_prog=64, min_programs=1, wgrad=1)),  # deferred sums
        ("compiled", "fp32", dict(B=2, H=2, N=41, Dh=32, T=70, D=16)),
        # the Mamba-2 scan, forward only: T not a multiple of the chunk, chunk 16 / 32 / 64, P and N below 16
        # (padded tiles), an initial state, bf16 inputs, inside torch.compile
        ("ssd_scan", "fp32", dict(B=2, T=45, H=3, chunk=16)),
        ("ssd_scan", "fp32", dict(B=1, T=100, H=2, P=8, N=4, chunk=32, with_h0=True)),
        ("ssd_scan", "bf16", dict(B=2, T=70, H=2, chunk=64)),
        ("ssd_scan", "fp32", dict(B=1, T=40, H=2, chunk=16, compiled=True)),
        ("ssd_scan", "fp32", dict(B=1, T=100, H=2, P=8, N=4, chunk=16, with_h0=True, split=1)),  # chunk-parallel
        ("ssd_scan", "fp32", dict(B=1, T=1, H=2, chunk=16, with_h0=True)),  # one step
        ("ssd_scan", "fp32", dict(B=1, T=45, H=2, P=32, N=32, chunk=16)),  # the dispatcher's widest P and N
        ("ssd_scan", "fp16", dict(B=1, T=45, H=2, chunk=16, with_h0=True)),  # fp16 is dispatched too
        ("ssd_scan", "fp32", dict(B=1, T=100, H=2, chunk=32, with_h0=True, resets=3)),  # resets inside chunks
        ("ssd_scan", "fp32", dict(B=1, T=100, H=2, chunk=32, with_h0=True, resets=3, split=1)),
        ("block", "fp32", dict(B=2, T=40, D=16)),
        ("rope", "fp32", dict(B=2, N=37, dim=32, n_heads=2)),
        # the fused IntegralLNN decode step: B 1 and 3, fp32 and bf16, 7 steps (the 3-slot ring wraps twice),
        # d not a power of two (48: SwiGLU hidden 128), conv kernels 2 and 1 (no ring), and inside torch.compile
        ("lnn_step", "fp32", dict(B=1, D=32)),
        ("lnn_step", "fp32", dict(B=3, D=48)),
        ("lnn_step", "bf16", dict(B=1, D=32)),
        ("lnn_step", "bf16", dict(B=3, D=48, steps=5)),
        ("lnn_step", "fp32", dict(B=3, D=32, conv_kernel=2, steps=3)),
        ("lnn_step", "fp32", dict(B=2, D=32, conv_kernel=1, steps=2)),
        ("lnn_step", "fp32", dict(B=2, D=32, steps=4, compiled=True)),
        ("lnn_step", "fp16", dict(B=2, D=32, steps=4)),  # fused_step_auto takes fp16 models too
        ("lnn_generate", "fp32", dict(n_new=16, block_n=32)),
        # the decoder's head as one kernel (norm + GEMV): B 1 and 3, d not a power of two, V split over programs,
        # fp32 / bf16 / fp16, eager and compiled; and greedy generation through it
        ("byte_head", "fp32", dict(B=1, D=32)),
        ("byte_head", "fp32", dict(B=3, D=48, V=256, block_n=64)),
        ("byte_head", "bf16", dict(B=3, D=48)),
        ("byte_head", "fp16", dict(B=2, D=32)),
        ("byte_head", "bf16", dict(B=2, D=40, V=200, block_n=64)),  # V not a multiple of the block
        ("lnn_generate", "fp32", dict(n_new=16, block_n=32, head=True)),
        # the hashed n-gram embedding: 4 sizes (ring of 4), 2 sizes without digits, one size (ring of 1), 3 sizes
        # whose n-grams skip ring slots, a large bucket count; greedy generation through it and the head
        ("embed_step", "fp32", dict(B=2, D=32)),
        ("embed_step", "bf16", dict(B=3, D=48, sizes=[2, 3], mode="hash_nodigit")),
        ("embed_step", "fp16", dict(B=1, D=40, sizes=[1], buckets=16)),
        ("embed_step", "bf16", dict(B=2, D=24, sizes=[3, 5, 7], buckets=4096, mode="hash_nodigit", steps=9)),
        ("lnn_generate", "fp32", dict(n_new=16, block_n=32, head=True, embed=True)),
        # the fused entropy-model (Mamba) step: B 1 and 3, fp32 and bf16, 7 steps (the 3-slot ring wraps twice),
        # block 0's table form (gather), d_inner split over two programs, headdim 8 and 16, d_state 4 and 16,
        # conv kernels 2 and 1 (no ring), inside torch.compile; and greedy generation of a tiny model
        ("ssm_step", "fp32", dict(B=1, D=16, d_state=4, headdim=8)),
        ("ssm_step", "fp32", dict(B=3, D=16, d_state=16, headdim=16, gather=True, block_c=16)),
        ("ssm_step", "bf16", dict(B=1, D=16, d_state=4, headdim=8, gather=True)),
        ("ssm_step", "bf16", dict(B=3, D=24, d_state=16, headdim=16, steps=5)),
        ("ssm_step", "fp32", dict(B=2, D=16, d_state=4, headdim=8, conv_kernel=2, steps=3)),
        ("ssm_step", "fp32", dict(B=2, D=16, d_state=4, headdim=8, conv_kernel=1, steps=2)),
        ("ssm_step", "fp32", dict(B=2, D=16, d_state=4, headdim=8, steps=4, compiled=True)),
        ("ssm_step", "fp16", dict(B=2, D=16, d_state=4, headdim=8, steps=4)),
        ("ssm_generate", "fp32", dict(n_new=16, block_c=32)),
        # the fused latent step (five kernels per block): B 1..3, fp32 and bf16, dilated and dense attention,
        # d 48 (not a power of two; 3 heads of 16), random commit masks, inside torch.compile, greedy generation.
        # One GEMV program per kernel (block_n 128): the interpreter's cost is per program.
        ("latent_step", "fp32", dict(B=1, D=32, H=2, steps=4, block_n=128)),
        ("latent_step", "fp32", dict(B=3, D=48, H=3, n_layers=1, steps=3, attention="dense", block_n=128)),
        ("latent_step", "bf16", dict(B=2, D=32, H=2, n_layers=1, steps=3, block_n=128)),
        ("latent_step", "bf16", dict(B=2, D=32, H=2, n_layers=1, steps=3, attention="dense", block_n=128)),
        ("latent_step", "fp32", dict(B=2, D=32, H=2, steps=2, compiled=True, block_n=128)),
        ("latent_step", "fp16", dict(B=2, D=32, H=2, n_layers=1, steps=2, block_n=128)),
        ("latent_generate", "fp32", dict(n_new=10, n_layers=1, block_n=128)),
        ("latent_generate", "fp32", dict(n_new=10, n_layers=1, attention="dense", block_n=128)),
    ]
    if large:
        cs += [
            ("attention", "fp32", dict(B=2, H=4, N=1000, Dh=64, segments=True)),
            ("attention", "fp32", dict(B=1, H=4, N=4096, Dh=128, prefetch=True)),
            ("attention", "bf16", dict(B=1, H=4, N=5000, Dh=64, segments=True, prefetch=True)),
            ("attention", "fp32", dict(B=1, H=4, N=2049, Dh=64, store_ds=False)),
            ("attention", "bf16", dict(B=1, H=16, N=16384, Dh=64)),
            ("attention", "bf16", dict(B=2, H=8, N=4097, Dh=32, segments=True)),
            ("attention", "bf16", dict(B=1, H=8, N=8192, Dh=96, segments=True)),
            ("attention", "fp16", dict(B=1, H=8, N=3000, Dh=64)),
            ("attention", "bf16", dict(B=1, H=8, N=4096, Dh=64, logit_std=16.0)),
            ("scan", "fp32", dict(B=4, T=8193, D=256, with_h0=True)),
            ("scan", "fp32", dict(B=2, T=4096, D=200, n_chunks=7)),
            ("scan", "bf16", dict(B=16, T=8192, D=256)),
            ("scan", "bf16", dict(B=1, T=32768, D=64, with_h0=True)),
            ("scan", "fp16", dict(B=8, T=2048, D=512)),
            ("conv_gate", "bf16", dict(B=8, T=8192, D=256)),  # ionllama-small's local layers at seq 8192
            ("conv_gate", "bf16", dict(B=8, T=8192, D=256, wgrad=1)),
            ("conv_gate", "fp32", dict(B=4, T=8193, D=200)),
            ("conv_gate", "bf16", dict(B=64, T=1024, D=256)),
            ("conv_gate", "fp16", dict(B=2, T=4096, D=128, k=3, rows_per_prog=1024, min_programs=1)),
            ("conv_gate", "fp32", dict(B=2, T=4099, D=256, k=7)),
            ("compiled", "bf16", dict(B=2, H=8, N=3000, Dh=64, T=4096, D=128)),
            ("block", "fp32", dict(B=2, T=2048, D=256)),  # wiring; bf16 accuracy: the conv_gate/scan rows
            ("rope", "fp32", dict(B=2, N=2048, dim=512, n_heads=8)),  # ionllama-small's latent width
            # ionllama-small's entropy model (16 heads of 16, state 16) at the Phase-1 shape and at seq 8192
            ("ssd_scan", "bf16", dict(B=64, T=1024, H=16, chunk=64)),
            ("ssd_scan", "fp32", dict(B=8, T=8192, H=16, chunk=32, with_h0=True)),
            ("ssd_scan", "bf16", dict(B=8, T=8192, H=16, chunk=64, compiled=True)),
            ("ssd_scan", "bf16", dict(B=4, T=2048, H=8, P=64, N=64, chunk=64)),  # MambaByte's heads and state
            ("ssd_scan", "fp32", dict(B=2, T=1000, H=4, P=64, N=64, chunk=64, with_h0=True)),
            ("ssd_scan", "bf16", dict(B=8, T=8192, H=16, chunk=64, split=1)),  # the chunk-parallel form
            ("ssd_scan", "fp32", dict(B=64, T=1024, H=16, chunk=64, with_h0=True, split=1)),
            ("ssd_scan", "bf16", dict(B=8, T=8192, H=16, chunk=64, compiled=True, split=1)),
            ("ssd_scan", "bf16", dict(B=4, T=2048, H=8, P=64, N=64, chunk=64, split=1)),
            # ionllama-small's local layers (d 256, hidden 704) at batch 1 and 32 (two row blocks of 16 .. 32)
            ("lnn_step", "bf16", dict(B=1, D=256, steps=9)),
            ("lnn_step", "bf16", dict(B=32, D=256, steps=9)),
            ("lnn_step", "fp32", dict(B=17, D=256, steps=9)),
            ("lnn_step", "bf16", dict(B=1, D=256, steps=5, compiled=True)),
            ("lnn_generate", "fp32", dict(n_new=64)),  # fp32: bf16 logits tie too often for equal greedy bytes
            ("byte_head", "bf16", dict(B=1, D=256)),  # ionllama-small's decoder head, batch 1, 17 and 32
            ("byte_head", "fp32", dict(B=17, D=256)),
            ("byte_head", "bf16", dict(B=32, D=256, block_n=64)),
            ("lnn_generate", "fp32", dict(n_new=64, head=True)),
            ("embed_step", "bf16", dict(B=1, D=256, buckets=4096)),  # ionllama-small's embedding, batch 1 and 32
            ("embed_step", "bf16", dict(B=32, D=256, buckets=4096, mode="hash_nodigit")),
            ("lnn_generate", "fp32", dict(n_new=64, head=True, embed=True)),
            # ionllama-small's entropy model (d 128, d_inner 256, 16 heads of 16, d_state 16) at batch 1 and 32
            # (two row blocks of 16 .. 32), block 0's table form, medium's width (d 256), inside torch.compile
            ("ssm_step", "bf16", dict(B=1, D=128, steps=9)),
            ("ssm_step", "bf16", dict(B=1, D=128, steps=9, gather=True)),
            ("ssm_step", "bf16", dict(B=32, D=128, steps=9)),
            ("ssm_step", "fp32", dict(B=17, D=128, steps=9, gather=True)),
            ("ssm_step", "bf16", dict(B=2, D=256, steps=5)),
            ("ssm_step", "bf16", dict(B=1, D=128, steps=5, compiled=True)),
            ("ssm_generate", "fp32", dict(n_new=64)),
            # ionllama-small's latent blocks (d 512, 8 heads of 64, hidden 1376) at batch 1, 17 and 32, the cache
            # long enough for several dilated offsets past the local ones and dense key blocks. bf16: the attention
            # output rounds apart from SDPA's on some elements (CPU interpreter, 2 blocks: ctx 7e-3, caches 3e-4),
            # so the 4-block compiled case runs in fp32
            ("latent_step", "bf16", dict(B=1, D=512, H=8, steps=6, max_len=300)),
            ("latent_step", "bf16", dict(B=1, D=512, H=8, steps=6, max_len=300, attention="dense")),
            ("latent_step", "bf16", dict(B=32, D=512, H=8, steps=4, max_len=200)),
            ("latent_step", "fp32", dict(B=17, D=512, H=8, steps=4, max_len=200, attention="dense")),
            ("latent_step", "fp32", dict(B=1, D=512, H=8, n_layers=4, steps=4, max_len=300, compiled=True)),
            ("latent_generate", "fp32", dict(n_new=64)),
            ("latent_generate", "fp32", dict(n_new=64, attention="dense")),
        ]
    return cs


KINDS = ("attention", "scan", "conv_gate", "compiled", "ssd_scan", "block", "rope", "lnn_step", "lnn_generate",
         "byte_head", "embed_step", "ssm_step", "ssm_generate", "latent_step", "latent_generate")


# kinds whose reference is the PyTorch path in the tested dtype, so both sides round: in bf16 / fp16 two right
# answers differ by about the dtype's epsilon, and a rare draw lands past the tolerance (latent_step bf16 with dense
# attention: ctx 1.007e-2 in a clean-clone CI run of the sixty-first session, where 300 seeds on this machine reached
# at most 7.8e-3). Such a row gets a second, fresh draw, as the greedy-bytes rows do; a kernel error fails both.
SAME_DTYPE_KINDS = ("lnn_step", "byte_head", "embed_step", "ssm_step", "latent_step")


def run(device: str, large: bool = False, verbose: bool = True, kinds=KINDS) -> list[dict]:
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    rows = []
    for kind, dt, kw in cases(large):
        if kind not in kinds:
            continue
        dtype = DTYPES[dt]
        t0 = time.perf_counter()
        fn = {"attention": check_attention, "scan": check_scan, "conv_gate": check_conv_gate,
              "compiled": check_compiled, "ssd_scan": check_ssd_scan, "block": check_block, "rope": check_rope,
              "lnn_step": check_lnn_step, "lnn_generate": check_lnn_generate, "byte_head": check_byte_head,
              "embed_step": check_embed_step,
              "ssm_step": check_ssm_step,
              "ssm_generate": check_ssm_generate, "latent_step": check_latent_step,
              "latent_generate": check_latent_generate}[kind]
        errs = fn(device, dtype, **kw)
        tol = TOL[dtype]
        retried = None
        # greedy bytes of a random model can part at a near-tie (two logits, or an entropy at the patch threshold)
        # where the fused and PyTorch steps round differently, both right: seen in a clean-clone CI run of the
        # fiftieth session (lnn_generate fp32, 13 of 32 bytes after the split); same-dtype rows in bf16 / fp16: see
        # SAME_DTYPE_KINDS. A kernel error fails on any seed, so a second, fresh seed decides; the first result stays.
        near_tie = kind.endswith("_generate") and errs["bytes_differ"] > tol
        rounding = kind in SAME_DTYPE_KINDS and dtype != torch.float32 and any(e > tol for e in errs.values())
        if near_tie or rounding:
            retried = {"first_errors": errs}
            errs = fn(device, dtype, **kw)
        row = dict(kind=kind, dtype=dt, shape=kw, errors=errs, tol=tol,
                   ok=all(e <= tol for e in errs.values()), seconds=round(time.perf_counter() - t0, 2))
        if retried:
            row["retried"] = retried
        rows.append(row)
        if verbose:
            worst = max(errs.values())
            print(f"{'PASS' if row['ok'] else 'FAIL'} {kind:9s} {dt} {kw} worst rel err {worst:.2e} "
                  f"(tol {tol:.0e}) {row['seconds']}s", flush=True)
    return rows


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--large", action="store_true", help="add GPU-sized cases")
    p.add_argument("--json", default=None, help="write the rows as JSON to this path ('-' = stdout)")
    p.add_argument("--kinds", default=",".join(KINDS), type=_kinds, help="comma list of: " + ", ".join(KINDS))
    return p


def _kinds(text: str) -> str:
    """--kinds: a typo would silently check nothing of that kind, so it is refused (argparse: one line, exit 2)."""
    bad = [k for k in text.split(",") if k not in KINDS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown kind(s) {bad}; choose from {', '.join(KINDS)}")
    return text


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":  # read as triton is imported: too late here
        print("error: --device cpu runs the kernels under Triton's interpreter; run it as TRITON_INTERPRET=1 python -m "
              "ionllama.kernels.selfcheck --device cpu ...", file=sys.stderr)
        return 2
    rows = run(a.device, a.large, verbose=a.json != "-", kinds=tuple(a.kinds.split(",")))
    if a.json == "-":
        print(json.dumps(rows))
    elif a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
