"""IntegralLNN input gate in Triton: u = sigmoid(conv(x)[:D]) * conv(x)[D:], conv = causal depthwise, k taps.

x is (B, T, 2D): D gate channels then D candidate channels (the in_proj output's first 2D columns, read in
place through its strides). Why a kernel: under torch.compile the shifted-product conv, the gate and
their backward cost ~0.58 ms of GPU time per IntegralLNN block per training step on an H200
(ionllama-small, seq 8192, batch 8; docs/results/train-profile/custom-ops/profile_whole.txt): the
partitioner saves a padded copy of x, recomputes the conv in the backward and forms the weight gradient
from several (B, T, 2D) passes. Here the forward reads x once and writes u (the k-step halos are cache
hits); the backward recomputes conv and gate from x in registers and runs in two passes (below).

Forward (one program = BLOCK_T steps x BLOCK_D channel pairs):
    G_t = bg + sum_j wg_j x^g_{t-k+1+j},  C_t likewise,  u_t = sigmoid(G_t) C_t   (x_{<0} = 0)
Backward: with s = sigmoid(G), dG_t = du_t C_t s (1 - s), dC_t = du_t s,
    dx^g_t = sum_j wg_j dG_{t+k-1-j}   (dG at t..t+k-1: a shift along T, i.e. across threads)
    dwg_j = sum_{b,t} dG_t x^g_{t-k+1+j},  dbg = sum_{b,t} dG_t   (per-program partial sums, added by torch)

The backward, in two passes:
* Pass A (_conv_gate_bwd_gate) recomputes G, C once per row from the k shifted x rows (as the forward
  does), writes dGC = (dG, dC) as one (B, T, 2D) tensor and forms the weight/bias partial sums from the
  same x rows: reduced over each tile's rows (bwd_wgrad=0), or accumulated elementwise and reduced once per
  program (bwd_wgrad=1, k <= 4; pass A is bound by instructions, not memory: 327 us against a ~60 us floor).
* Pass B (_conv_gate_bwd_dx) is the transposed stencil dx_t = sum_s w_{k-1-s} dGC_{t+s} over all 2D
  channels (k shifted loads of dGC, halo rows cache hits).
Traffic in units of B*T*D elements of x's dtype: A reads du (1) + x (2) and writes dGC (2), B reads dGC
(2) and writes dx (2): 9 units against the floor of 5 (du, x in, dx out) with dGC in x's dtype
(bwd_dgc_fp32=0; under bf16 autocast the reference's own backward rounds these products to bf16 as well),
13 with dGC in fp32 (bwd_dgc_fp32=1, the default). The weight/bias gradients use the fp32 values in
registers either way.

Why two passes: dx_t needs dG, dC at t..t+k-1, a shift across threads. A single pass at the floor's 5 units
(the first kernel, removed) had to recompute the whole conv and gate for each of the k shifts (about
k (2k + 1) + 2k tile loads per row, k sigmoids) and was bound by instructions, not memory. Sending the shift
through memory is faster despite the extra traffic: on an H200 (ionllama-small, seq 8192, batch 8, bf16,
fifth session 2026-11-30) this backward takes 418 us per call (pass A 327 us, pass B 65 us) against 533 us
for the single-pass kernel in the fourth session (torch.profiler over the whole-model-compiled training
step: docs/results/speed-ab-h200-s5/call3/train/prof_new/profile_ionllama_small.txt; the single-pass
kernel's: docs/results/speed-ab-h200/train/prof_new/profile_ionllama_small.txt).

The oracle is ``ionllama.model.conv.causal_conv_gate_reference``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch_config import update_config


@triton.jit
def _conv_pair(x_base, W, BIAS, t, t_ok, cols, col_ok, D, sxt, swc, K: tl.constexpr, BLOCK_T: tl.constexpr,
               BLOCK_D: tl.constexpr):
    """fp32 causal conv at steps t of gate channels `cols` and candidate channels `cols + D`."""
    g = tl.zeros([BLOCK_T, BLOCK_D], tl.float32) + tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    c = tl.zeros([BLOCK_T, BLOCK_D], tl.float32) + tl.load(BIAS + D + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    for j in tl.static_range(K):
        src = t - (K - 1) + j
        m = (t_ok & (src >= 0))[:, None] & col_ok[None, :]
        p = x_base + src[:, None] * sxt + cols[None, :]
        wg = tl.load(W + cols * swc + j, mask=col_ok, other=0.0).to(tl.float32)
        wc = tl.load(W + (cols + D) * swc + j, mask=col_ok, other=0.0).to(tl.float32)
        g += tl.load(p, mask=m, other=0.0).to(tl.float32) * wg[None, :]
        c += tl.load(p + D, mask=m, other=0.0).to(tl.float32) * wc[None, :]
    return g, c


@triton.jit(do_not_specialize=["T"])  # an int of 1 gets its own compile (1-byte prompts)
def _conv_gate_fwd(X, W, BIAS, U, T, D, sxb, sxt, swc, sub, sut,
                   K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    t_ok = t < T
    col_ok = cols < D
    g, c = _conv_pair(X + b * sxb, W, BIAS, t, t_ok, cols, col_ok, D, sxt, swc, K, BLOCK_T, BLOCK_D)
    u = tl.sigmoid(g) * c
    tl.store(U + b * sub + t[:, None] * sut + cols[None, :], u.to(U.dtype.element_ty),
             mask=t_ok[:, None] & col_ok[None, :])


@triton.jit
def _conv_gate_bwd_gate(X, W, BIAS, DU, DGC, DWP, DBP, T, D, rows_per_prog, n_tprog, sxb, sxt, swc, sdb, sdt,
                        sgb, sgt, K: tl.constexpr, KP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                        DEFER: tl.constexpr):
    """Backward, pass A. One program: rows [pt * rows_per_prog, +rows_per_prog) of batch row b,
    BLOCK_D channel pairs. Writes DGC (B, T, 2D) = (dG, dC) and the fp32 partial sums DWP (B * n_tprog, K, 2D),
    DBP (B * n_tprog, 2D) of the weight / bias gradients.
    DEFER 0: each BLOCK_T-row tile reduces its 2K + 2 products over rows (tl.sum(., 0)) into [KP, BLOCK_D] /
    [BLOCK_D] accumulators. DEFER 1 (K <= 4): the products accumulate elementwise in [BLOCK_T, BLOCK_D] fp32 tiles
    (named ones: Triton has no lists of tensors) and are reduced over rows once, after the row loop."""
    tl.static_assert(K <= 4 or not DEFER, "DEFER holds at most 4 taps' accumulators")
    b = tl.program_id(0).to(tl.int64)
    pt = tl.program_id(1)
    cols = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    x_base = X + b * sxb
    du_base = DU + b * sdb + cols[None, :]
    dgc_base = DGC + b * sgb + cols[None, :]
    taps = tl.arange(0, KP)
    prog = b * n_tprog + pt
    if DEFER:  # tap j's (dG x^g, dC x^c) products: (eg<j>, ec<j>); bias: (eg, ec)
        eg = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
        ec = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
        eg0 = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
        ec0 = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
        eg1 = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
        ec1 = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
        eg2 = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
        ec2 = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
        eg3 = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
        ec3 = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
    else:
        acc_wg = tl.zeros([KP, BLOCK_D], tl.float32)
        acc_wc = tl.zeros([KP, BLOCK_D], tl.float32)
        acc_bg = tl.zeros([BLOCK_D], tl.float32)
        acc_bc = tl.zeros([BLOCK_D], tl.float32)
    t_start = pt * rows_per_prog
    t_end = tl.minimum(t_start + rows_per_prog, T)
    for t0 in range(t_start, t_end, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        t_ok = t < t_end
        m = t_ok[:, None] & col_ok[None, :]
        g, c = _conv_pair(x_base, W, BIAS, t, t_ok, cols, col_ok, D, sxt, swc, K, BLOCK_T, BLOCK_D)
        du = tl.load(du_base + t[:, None] * sdt, mask=m, other=0.0).to(tl.float32)  # 0 past t_end: dg = dc = 0
        sg = tl.sigmoid(g)
        dc = du * sg
        dg = dc * c * (1.0 - sg)
        tl.store(dgc_base + t[:, None] * sgt, dg.to(DGC.dtype.element_ty), mask=m)
        tl.store(dgc_base + t[:, None] * sgt + D, dc.to(DGC.dtype.element_ty), mask=m)
        if DEFER:
            eg += dg
            ec += dc
        else:
            acc_bg += tl.sum(dg, 0)
            acc_bc += tl.sum(dc, 0)
        for j in tl.static_range(K):  # the conv's x rows again (cache hits)
            src = t - (K - 1) + j
            mj = (t_ok & (src >= 0))[:, None] & col_ok[None, :]
            p = x_base + src[:, None] * sxt + cols[None, :]
            xg = tl.load(p, mask=mj, other=0.0).to(tl.float32)
            xc = tl.load(p + D, mask=mj, other=0.0).to(tl.float32)
            if DEFER:
                if j == 0:
                    eg0 += dg * xg
                    ec0 += dc * xc
                elif j == 1:
                    eg1 += dg * xg
                    ec1 += dc * xc
                elif j == 2:
                    eg2 += dg * xg
                    ec2 += dc * xc
                else:
                    eg3 += dg * xg
                    ec3 += dc * xc
            else:
                acc_wg += tl.where(taps[:, None] == j, tl.sum(dg * xg, 0)[None, :], 0.0)
                acc_wc += tl.where(taps[:, None] == j, tl.sum(dc * xc, 0)[None, :], 0.0)
    if DEFER:
        w_ptr = DWP + prog * K * (2 * D) + cols
        for j in tl.static_range(K):
            if j == 0:
                tl.store(w_ptr, tl.sum(eg0, 0), mask=col_ok)
                tl.store(w_ptr + D, tl.sum(ec0, 0), mask=col_ok)
            elif j == 1:
                tl.store(w_ptr + 2 * D, tl.sum(eg1, 0), mask=col_ok)
                tl.store(w_ptr + 3 * D, tl.sum(ec1, 0), mask=col_ok)
            elif j == 2:
                tl.store(w_ptr + 4 * D, tl.sum(eg2, 0), mask=col_ok)
                tl.store(w_ptr + 5 * D, tl.sum(ec2, 0), mask=col_ok)
            else:
                tl.store(w_ptr + 6 * D, tl.sum(eg3, 0), mask=col_ok)
                tl.store(w_ptr + 7 * D, tl.sum(ec3, 0), mask=col_ok)
        acc_bg = tl.sum(eg, 0)
        acc_bc = tl.sum(ec, 0)
    else:
        m_w = (taps < K)[:, None] & col_ok[None, :]
        w_ptr = DWP + (prog * K + taps[:, None]) * (2 * D) + cols[None, :]
        tl.store(w_ptr, acc_wg, mask=m_w)
        tl.store(w_ptr + D, acc_wc, mask=m_w)
    tl.store(DBP + prog * (2 * D) + cols, acc_bg, mask=col_ok)
    tl.store(DBP + prog * (2 * D) + D + cols, acc_bc, mask=col_ok)


@triton.jit
def _conv_gate_bwd_dx(DGC, W, DX, T, C, sgb, sgt, swc, sdxb, sdxt,
                      K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """Backward, pass B: dx_t = sum_s w_{K-1-s} dGC_{t+s} (dGC_{>=T} = 0) over all C = 2D channels
    (gate and candidate alike: no pairing needed here). One program: BLOCK_T steps x BLOCK_C channels."""
    b = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    ch = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    ch_ok = ch < C
    base = DGC + b * sgb + ch[None, :]
    acc = tl.zeros([BLOCK_T, BLOCK_C], tl.float32)
    for s in tl.static_range(K):
        ts = t + s
        v = tl.load(base + ts[:, None] * sgt, mask=(ts < T)[:, None] & ch_ok[None, :], other=0.0).to(tl.float32)
        w = tl.load(W + ch * swc + (K - 1 - s), mask=ch_ok, other=0.0).to(tl.float32)
        acc += v * w[None, :]
    tl.store(DX + b * sdxb + t[:, None] * sdxt + ch[None, :], acc.to(DX.dtype.element_ty),
             mask=(t < T)[:, None] & ch_ok[None, :])


# Tiles: 32 steps x 64 channel pairs, 4 warps. The backward's pass A gives each program up to rows_per_prog
# steps (its weight-gradient partials are one row of DWP per program) and halves that while the grid has
# fewer than min_programs programs. Pass B: dx_block_t steps x dx_block_c of the 2D channels. bwd_dgc_fp32:
# 1 (default) stores dGC in fp32 - in bf16 it rounds twice and dx's error under the interpreter was 6.5e-3
# against 3.8e-3 for fp32 (tolerance 1e-2); 0 moves 4 units less.
# bwd_wgrad: pass A's weight/bias gradient sums, 0 = reduced over rows per BLOCK_T tile (2K + 2 cross-row
# tl.sum per tile), 1 = deferred (elementwise fp32 accumulators of BLOCK_T x BLOCK_D per tap, reduced once per
# program; more registers: 2K + 2 such tiles); 1 applies to k <= 4 only, larger k runs 0 (_wgrad_variant).
# Registers (ptxas -v for sm_90, bf16, k 4, block_d 64): variant 0 spills 896 bytes at 32 steps x 4 warps, none
# at 16 x 4 or 32 x 8; variant 1 spills 6 KB at 32 x 4, 372 bytes at 32 x 8, 8 bytes at 16 x 4.
# The backward's defaults are the sweep's best with dGC kept in fp32 (benchmarks/bench_conv_gate.py --sweep, H200,
# sixteenth session, docs/results/kernels.md): variant 1, 16 steps x 8 warps, 1024 rows per program, backward
# 0.239 ms against 0.423 ms for the earlier 32 x 4 / 256 rows / variant 0 at B 8, T 8192, D 256 (pass A
# 329 -> ~150 us). bwd_dgc_fp32 0 was 0.030 ms faster again, at 2.3e-3 against 1.7e-3 relative error: not taken.
_CONFIG = {"block_t": 32, "block_d": 64, "num_warps": 4, "bwd_block_t": 16, "bwd_num_warps": 8,
           "rows_per_prog": 1024, "min_programs": 1, "bwd_dgc_fp32": 1, "bwd_wgrad": 1,
           "dx_block_t": 32, "dx_block_c": 128, "dx_num_warps": 4}
WGRAD_MAX_TAPS = 4  # the deferred variant's named accumulators (_conv_gate_bwd_gate, DEFER=1)


def set_conv_gate_config(**kw) -> dict:
    """Set any of _CONFIG's keys; returns the previous configuration."""
    return update_config(_CONFIG, "conv-gate", kw, int)


def _rows_per_prog(B: int, T: int, D: int) -> int:
    bt = _CONFIG["bwd_block_t"]
    rpp = max(bt, triton.cdiv(_CONFIG["rows_per_prog"], bt) * bt)
    n_d = triton.cdiv(D, _CONFIG["block_d"])
    while rpp > bt and B * triton.cdiv(T, rpp) * n_d < _CONFIG["min_programs"]:
        rpp = max(bt, triton.cdiv(rpp // 2, bt) * bt)
    return rpp


def _wgrad_variant(K: int) -> int:
    """Pass A's weight-gradient variant for k taps: _CONFIG["bwd_wgrad"], except 0 when k > WGRAD_MAX_TAPS."""
    v = _CONFIG["bwd_wgrad"]
    if v not in (0, 1):
        raise ValueError(f"conv-gate bwd_wgrad must be 0 or 1, got {v}")
    return v if K <= WGRAD_MAX_TAPS else 0


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor):
    B, T, C = x.shape
    if C % 2 or weight.dim() != 2 or weight.shape[0] != C or bias.shape != (C,):
        raise ValueError(f"conv gate: x (B, T, 2D), weight (2D, k), bias (2D); got {tuple(x.shape)}, "
                         f"{tuple(weight.shape)}, {tuple(bias.shape)}")
    return B, T, C // 2, weight.shape[1]


def conv_gate_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    B, T, D, K = _check(x, weight, bias)
    u = torch.empty((B, T, D), dtype=x.dtype, device=x.device)
    bt, bd = _CONFIG["block_t"], _CONFIG["block_d"]
    _conv_gate_fwd[(B, triton.cdiv(T, bt), triton.cdiv(D, bd))](
        x, weight, bias, u, T, D, x.stride(0), x.stride(1), weight.stride(0), u.stride(0), u.stride(1),
        K=K, BLOCK_T=bt, BLOCK_D=bd, num_warps=_CONFIG["num_warps"])
    return u


def conv_gate_backward(du: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor):
    """(dx in x's dtype, dweight (2D, k) fp32, dbias (2D,) fp32): pass A, then pass B."""
    B, T, D, K = _check(x, weight, bias)
    rpp = _rows_per_prog(B, T, D)
    n_t = triton.cdiv(T, rpp)
    bd = _CONFIG["block_d"]
    KP = max(2, triton.next_power_of_2(K))
    dx = torch.empty((B, T, 2 * D), dtype=x.dtype, device=x.device)
    dwp = torch.empty((B * n_t, K, 2 * D), dtype=torch.float32, device=x.device)
    dbp = torch.empty((B * n_t, 2 * D), dtype=torch.float32, device=x.device)
    dgc = torch.empty((B, T, 2 * D), dtype=torch.float32 if _CONFIG["bwd_dgc_fp32"] else x.dtype, device=x.device)
    _conv_gate_bwd_gate[(B, n_t, triton.cdiv(D, bd))](
        x, weight, bias, du, dgc, dwp, dbp, T, D, rpp, n_t, x.stride(0), x.stride(1), weight.stride(0),
        du.stride(0), du.stride(1), dgc.stride(0), dgc.stride(1),
        K=K, KP=KP, BLOCK_T=_CONFIG["bwd_block_t"], BLOCK_D=bd, DEFER=_wgrad_variant(K),
        num_warps=_CONFIG["bwd_num_warps"])
    bt, bc = _CONFIG["dx_block_t"], _CONFIG["dx_block_c"]
    _conv_gate_bwd_dx[(B, triton.cdiv(T, bt), triton.cdiv(2 * D, bc))](
        dgc, weight, dx, T, 2 * D, dgc.stride(0), dgc.stride(1), weight.stride(0), dx.stride(0), dx.stride(1),
        K=K, BLOCK_T=bt, BLOCK_C=bc, num_warps=_CONFIG["dx_num_warps"])
    return dx, dwp.sum(0).t(), dbp.sum(0)


def _inner_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


# Custom ops, like the scan and the attention kernel: one opaque node each for torch.compile.
@torch.library.custom_op("ionllama::conv_gate_fwd", mutates_args=())
def conv_gate_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return conv_gate_forward(_inner_contiguous(x), weight.contiguous(), bias.contiguous())


@conv_gate_fwd.register_fake
def _(x, weight, bias):
    B, T, C = x.shape
    return x.new_empty((B, T, C // 2))


@torch.library.custom_op("ionllama::conv_gate_bwd", mutates_args=())
def conv_gate_bwd(du: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                  bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx in x's dtype, dweight in weight's dtype, dbias in bias's dtype)."""
    dx, dw, db = conv_gate_backward(_inner_contiguous(du), _inner_contiguous(x), weight.contiguous(),
                                    bias.contiguous())
    return dx, dw.to(weight.dtype).contiguous(), db.to(bias.dtype)


@conv_gate_bwd.register_fake
def _(du, x, weight, bias):
    return x.new_empty(x.shape), weight.new_empty(weight.shape), bias.new_empty(bias.shape)


def _setup_context(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight, bias)


def _backward(ctx, du):
    x, weight, bias = ctx.saved_tensors
    return conv_gate_bwd(du, x, weight, bias)


conv_gate_fwd.register_autograd(_backward, setup_context=_setup_context)


def conv_gate_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Triton conv gate (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1); same contract as the reference:
    x (B, T, 2D), weight (2D, k), bias (2D) -> u (B, T, D) in x's dtype (computed in fp32)."""
    return conv_gate_fwd(x, weight, bias)
