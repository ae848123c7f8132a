"""One decode step of the entropy model's Mamba-2 block in two Triton kernels, and its head + entropy in one
(forward only, small batches).

Why: batch-1 generation is GPU-bound on kernel count (issue #4). The entropy model's byte step
(IonLlamaDecoder.byte_step_entropy) runs, per MambaBlock, in_proj (block 0: a table row), the ring conv step,
SiLU, softplus dt, the exp decay, the SSM state update, D skip, the SiLU(z) gate, RMSNorm, out_proj and the
residual as a dozen or more kernels compiled. Here a block is two launches and the head one:

  K1 _ssm_in_scan:  [RMSNorm(x) -> in_proj rows | block 0: the rows of the precomputed table at the byte]
                    for a block of d_inner channels (z, x, the channels' dt rows) and all of B and C ->
                    the causal depthwise conv step of x, B, C over the ring buffer -> SiLU -> dt =
                    softplus(dt_raw + dt_bias), decay = exp(dt * A) -> state (B, H, P, N) fp32 =
                    decay * state + (x dt) B^T, in place -> y = state C -> y + D x -> y * SiLU(z) = yg.
                    The new x inputs go into the ring slot t % k (in place); the new B and C inputs (read by
                    every program) are stored next to yg for K2 to write.
  K2 _ssm_out:      RMSNorm(yg) -> out_proj rows of a channel block -> out = x + that (block 0: x is the
                    embedding row of the byte); program 0 of each row block writes the B, C ring slot.
  K3 _entropy_head: RMSNorm(h) -> the 256 head logits of a row block (K loop over d) -> the entropy of their
                    softmax in bits (as ionllama_decoder._entropy_bits_step), fp32.

Grid of K1: (d_inner channel blocks, batch row blocks); K2: (d channel blocks, row blocks); K3: (row blocks,).
Each program recomputes the norm of its whole rows (the row is one tile), and K1's programs all recompute B
and C (2 * d_state channels). A GEMV is ``tl.dot`` of the rows (padded to BLOCK_B >= 16, the MMA minimum) with
the program's weight rows, fp32 accumulation (fp32 models: input_precision ieee; under the CPU interpreter the
operands are upcast to fp32, see lnn_step_triton._rows_times_wt). The per-channel dt row of a channel is its
head's row (channels c of head c // P load the same weight row).

Ring buffer (as local_state.RingConv): buf (B, k, C), C = d_inner + 2 d_state (x, B, C channels), k = conv
kernel - 1, holds the conv input of byte p in slot p % k; at step t slot s is multiplied by conv weight tap
(s - t) mod k (tap k multiplies the new input); the new input replaces slot t % k after all reads.

Dtypes follow the PyTorch step (Mamba2Mixer.step_from_proj with RingConv) run eagerly in the model's dtype
(bf16 / fp16 / fp32; weights, activations and the ring in that dtype; the SSM state, dt, the decay and A fp32):
every tensor that path materialises in the activation dtype (the normalised inputs, the GEMV outputs, each conv
product and partial sum, the SiLU outputs, dt cast for x * dt, x * dt, y, D x, y + D x, SiLU(z), the gated y,
the logits, the residual sum) is rounded to it here too (round to nearest even, lnn_step_triton._round), with
fp32 arithmetic and fp32 GEMV accumulation in between. So low-precision results differ from the eager PyTorch
path by the order of fp32 sums, and by fp32 exp / log / sigmoid / rsqrt implementations (softplus: log1p by
the log(u) * e / (u - 1) identity, a few ulp).

The reference is ``ionllama.generation.local_state.MambaState.step`` (the decoder's PyTorch path) and
``ionllama_decoder._entropy_bits_step``; checked by ``ionllama.kernels.selfcheck`` kind "ssm_step". Block sizes
are untuned. On Hopper the three kernels launch with PDL (pdl.py): K1 (but block 0's table form) and K2 load their
weight tiles before waiting for the previous kernel.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch_config import update_config
from .lnn_step_triton import _cast, _rms_rows, _round, _rows_times_wt, _tile
from .pdl import gdc_launch, gdc_wait, pdl_kwargs

LN2 = tl.constexpr(0.6931471805599453)  # a global a jit function may read


@triton.jit
def _silu(v):
    return v * tl.sigmoid(v)


@triton.jit
def _softplus(v):
    """F.softplus (beta 1, threshold 20) in fp32; log1p(e) as log(u) * e / (u - 1), u = 1 + e (exact where
    u - 1 is: a few ulp, where log(1 + e) alone loses e's low bits for small e)."""
    e = tl.exp(v)
    u = 1.0 + e
    d = u - 1.0
    lp = tl.where(d == 0.0, e, tl.log(u) * (e / tl.where(d == 0.0, 1.0, d)))
    return tl.where(v > 20.0, v, lp)


@triton.jit
def _conv_step(inp, w_ch, b_ch, ring, ch_ok, m, t_mod, srs, KS: tl.constexpr, DT: tl.constexpr):
    """RingConv's step of one block of channels, rounded as its eager ops: (sum over ring slots s of
    buf[s] * tap (s - t) mod KS) + new input * tap KS + bias, every product and partial sum in DT (the slot sum
    itself in fp32). inp (BLOCK_B, C) fp32; w_ch / b_ch: pointers to the channels' weight rows / biases;
    ring: pointers to the rows' slot 0 of the channels; m: the (rows, channels) mask."""
    v = _round(inp * tl.load(w_ch + KS, mask=ch_ok, other=0.0).to(tl.float32)[None, :], DT)
    if KS > 0:
        acc = tl.zeros(inp.shape, tl.float32)
        for s in tl.static_range(KS):
            tap = ((s - t_mod + KS) % KS)[:, None]
            w = tl.load(w_ch[None, :] + tap, mask=m, other=0.0).to(tl.float32)
            acc += _round(tl.load(ring + s * srs, mask=m, other=0.0).to(tl.float32) * w, DT)
        v = _round(_round(acc, DT) + v, DT)
    return _round(v + tl.load(b_ch, mask=ch_ok, other=0.0).to(tl.float32)[None, :], DT)


@triton.jit
def _ssm_in_scan(X, TOK, TAB, NW, WIN, CW, CB, RING, SSM, T, DTB, NEGA, DSK, YG,
                 B, D, DI, N, P, eps, sxb, stab, swin, scw, srb, srs, ssb, syb,
                 KS: tl.constexpr, DP: tl.constexpr, NB: tl.constexpr, BLOCK_C: tl.constexpr,
                 BLOCK_B: tl.constexpr, GATHER: tl.constexpr, IEEE: tl.constexpr, GDC: tl.constexpr):
    DT = YG.dtype.element_ty
    rows, row_ok, rows64, c, c_ok = _tile(B, DI, BLOCK_B, BLOCK_C)
    hc = c // P  # each channel's head
    n = tl.arange(0, NB)
    n_ok = n < N
    m_rc = row_ok[:, None] & c_ok[None, :]
    m_rn = row_ok[:, None] & n_ok[None, :]
    # the channels' rows of zxbcdt = [z (DI) | x (DI) | B (N) | C (N) | dt (H)]
    r_z, r_x, r_b, r_c, r_dt = c, DI + c, 2 * DI + n, 2 * DI + N + n, 2 * DI + 2 * N + hc
    if GATHER:  # block 0: in_proj(norm(embed(byte))) from the table, by byte (all of it after the wait: pdl.py)
        gdc_wait(GDC)
        gdc_launch(GDC)
        tab = TAB + tl.load(TOK + rows, mask=row_ok, other=0).to(tl.int64)[:, None] * stab
        z = tl.load(tab + r_z[None, :], mask=m_rc, other=0.0).to(tl.float32)
        xi = tl.load(tab + r_x[None, :], mask=m_rc, other=0.0).to(tl.float32)
        bi = tl.load(tab + r_b[None, :], mask=m_rn, other=0.0).to(tl.float32)
        ci = tl.load(tab + r_c[None, :], mask=m_rn, other=0.0).to(tl.float32)
        dtr = tl.load(tab + r_dt[None, :], mask=m_rc, other=0.0).to(tl.float32)
    else:
        k = tl.arange(0, DP)
        k_ok = k < D
        m_ck = c_ok[:, None] & k_ok[None, :]
        m_nk = n_ok[:, None] & k_ok[None, :]
        nw = tl.load(NW + k, mask=k_ok, other=0.0).to(tl.float32)  # parameters before the wait (pdl.py)
        w_z = tl.load(WIN + r_z[:, None].to(tl.int64) * swin + k[None, :], mask=m_ck, other=0.0)
        w_x = tl.load(WIN + r_x[:, None].to(tl.int64) * swin + k[None, :], mask=m_ck, other=0.0)
        w_b = tl.load(WIN + r_b[:, None].to(tl.int64) * swin + k[None, :], mask=m_nk, other=0.0)
        w_c = tl.load(WIN + r_c[:, None].to(tl.int64) * swin + k[None, :], mask=m_nk, other=0.0)
        w_dt = tl.load(WIN + r_dt[:, None].to(tl.int64) * swin + k[None, :], mask=m_ck, other=0.0)
        gdc_wait(GDC)
        gdc_launch(GDC)
        x = tl.load(X + rows64[:, None] * sxb + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        a = _rms_rows(x.to(tl.float32), nw, eps, D, DT).to(DT)
        z = _round(_rows_times_wt(a, w_z, IEEE), DT)
        xi = _round(_rows_times_wt(a, w_x, IEEE), DT)
        bi = _round(_rows_times_wt(a, w_b, IEEE), DT)
        ci = _round(_rows_times_wt(a, w_c, IEEE), DT)
        dtr = _round(_rows_times_wt(a, w_dt, IEEE), DT)

    # conv step of x (conv channel c), B (DI + n), C (DI + N + n) over the ring, then SiLU (rounded to DT)
    t_mod = 0
    if KS > 0:
        t_mod = tl.load(T + rows, mask=row_ok, other=0) % KS  # t >= 0
    ring = RING + rows64[:, None] * srb
    xa = _round(_silu(_conv_step(xi, CW + c * scw, CB + c, ring + c[None, :], c_ok, m_rc, t_mod, srs, KS, DT)), DT)
    ba = _round(_silu(_conv_step(bi, CW + (DI + n) * scw, CB + DI + n, ring + (DI + n)[None, :], n_ok, m_rn,
                                 t_mod, srs, KS, DT)), DT)
    ca = _round(_silu(_conv_step(ci, CW + (DI + N + n) * scw, CB + DI + N + n, ring + (DI + N + n)[None, :],
                                 n_ok, m_rn, t_mod, srs, KS, DT)), DT)

    # dt = softplus(dt_raw + dt_bias) and log_a = dt * A in fp32 (A = -exp(A_log), as the model's dtype gives it)
    dt = _softplus(dtr + tl.load(DTB + hc, mask=c_ok, other=0.0).to(tl.float32)[None, :])
    decay = tl.exp(dt * tl.load(NEGA + hc, mask=c_ok, other=0.0)[None, :])
    xdt = _round(xa * _round(dt, DT), DT)  # (x * dt.to(x.dtype)), then fp32
    s_ptr = SSM + rows64[:, None, None] * ssb + c[None, :, None].to(tl.int64) * N + n[None, None, :]
    m3 = m_rc[:, :, None] & n_ok[None, None, :]
    s = decay[:, :, None] * tl.load(s_ptr, mask=m3, other=0.0) + xdt[:, :, None] * ba[:, None, :]
    tl.store(s_ptr, s, mask=m3)
    y = _round(tl.sum(s * ca[:, None, :], 2), DT)
    y = _round(y + _round(tl.load(DSK + hc, mask=c_ok, other=0.0).to(tl.float32)[None, :] * xa, DT), DT)
    yg = y * _round(_silu(z), DT)
    tl.store(YG + rows64[:, None] * syb + c[None, :], _cast(yg, DT), mask=m_rc)
    if KS > 0:
        tl.debug_barrier()  # every thread's ring reads are done before the slot is overwritten
        tl.store(ring + (t_mod * srs)[:, None] + c[None, :], xi.to(RING.dtype.element_ty), mask=m_rc)
        if tl.program_id(0) == 0:  # B and C are read by every program: K2 writes their slot
            tl.store(YG + rows64[:, None] * syb + (DI + n)[None, :], _cast(bi, DT), mask=m_rn)
            tl.store(YG + rows64[:, None] * syb + (DI + N + n)[None, :], _cast(ci, DT), mask=m_rn)


@triton.jit
def _ssm_out(X, TOK, YG, MNW, WOUT, RING, T, OUT, B, D, DI, N, eps, sxb, syb, swo, srb, srs, sob,
             KS: tl.constexpr, DIP: tl.constexpr, NB2: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_B: tl.constexpr, GATHER: tl.constexpr, IEEE: tl.constexpr, GDC: tl.constexpr):
    DT = OUT.dtype.element_ty
    rows, row_ok, rows64, n, n_ok = _tile(B, D, BLOCK_B, BLOCK_N)
    k = tl.arange(0, DIP)
    k_ok = k < DI
    m_rn = row_ok[:, None] & n_ok[None, :]
    mnw = tl.load(MNW + k, mask=k_ok, other=0.0).to(tl.float32)  # parameters before the wait (pdl.py)
    w = tl.load(WOUT + n[:, None].to(tl.int64) * swo + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
    gdc_wait(GDC)
    gdc_launch(GDC)
    yg = tl.load(YG + rows64[:, None] * syb + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
    a = _rms_rows(yg.to(tl.float32), mnw, eps, DI, DT).to(DT)
    o = _round(_rows_times_wt(a, w, IEEE), DT)
    if GATHER:  # block 0: the residual is the byte's embedding row
        xrow = tl.load(TOK + rows, mask=row_ok, other=0).to(tl.int64)
    else:
        xrow = rows64
    x = tl.load(X + xrow[:, None] * sxb + n[None, :], mask=m_rn, other=0.0).to(tl.float32)
    tl.store(OUT + rows64[:, None] * sob + n[None, :], _cast(x + o, DT), mask=m_rn)
    if KS > 0:
        if tl.program_id(0) == 0:  # the new B, C inputs into ring slot t % KS (K1 has finished reading it)
            j = tl.arange(0, NB2)
            m_rj = row_ok[:, None] & (j < 2 * N)[None, :]
            t_mod = tl.load(T + rows, mask=row_ok, other=0) % KS
            bc = tl.load(YG + rows64[:, None] * syb + (DI + j)[None, :], mask=m_rj, other=0.0)
            tl.store(RING + rows64[:, None] * srb + (t_mod * srs)[:, None] + (DI + j)[None, :],
                     bc.to(RING.dtype.element_ty), mask=m_rj)


@triton.jit
def _entropy_head(X, NW, WH, ENT, B, D, V, eps, sxb, swh,
                  DP: tl.constexpr, VP: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_B: tl.constexpr,
                  IEEE: tl.constexpr, GDC: tl.constexpr):
    DT = X.dtype.element_ty
    gdc_wait(GDC)  # the head's K slices load in the loop: only the launch overlaps here (pdl.py)
    gdc_launch(GDC)
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    rows64 = rows.to(tl.int64)
    k = tl.arange(0, DP)
    x = tl.load(X + rows64[:, None] * sxb + k[None, :], mask=row_ok[:, None] & (k < D)[None, :], other=0.0)
    x = x.to(tl.float32)
    rs = tl.rsqrt(tl.sum(x * x, 1) / D + eps)
    v = tl.arange(0, VP)
    v_ok = v < V
    acc = tl.zeros([BLOCK_B, VP], tl.float32)
    for k0 in tl.static_range(0, DP, BLOCK_K):  # the (V, d) head in K slices: (V, BLOCK_K) weight tiles
        kk = k0 + tl.arange(0, BLOCK_K)
        kk_ok = kk < D
        xk = tl.load(X + rows64[:, None] * sxb + kk[None, :], mask=row_ok[:, None] & kk_ok[None, :], other=0.0)
        nw = tl.load(NW + kk, mask=kk_ok, other=0.0).to(tl.float32)
        a = _cast(_round(xk.to(tl.float32) * rs[:, None], DT) * nw[None, :], DT)  # RMSNorm, as _rms_rows
        w = tl.load(WH + v[:, None].to(tl.int64) * swh + kk[None, :], mask=v_ok[:, None] & kk_ok[None, :], other=0.0)
        acc += _rows_times_wt(a, w, IEEE)
    lg = tl.where(v_ok[None, :], _round(acc, DT), float("-inf"))  # logits in DT
    zz = lg - tl.max(lg, 1)[:, None]
    e = tl.exp(zz)
    ssum = tl.sum(e, 1)
    ez = tl.sum(tl.where(v_ok[None, :], e * zz, 0.0), 1)
    tl.store(ENT + rows, (tl.log(ssum) - ez / ssum) / LN2, mask=row_ok)


# K1's d_inner channels per program, K2's output channels per program, K3's slice of d, warps. Rows per program:
# 16 (the tl.dot minimum) up to 32 (max_block_b). Untuned: no GPU measurement yet.
_CONFIG = {"scan_block_c": 16, "out_block_n": 16, "head_block_k": 32, "max_block_b": 32, "num_warps": 4}

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def set_ssm_step_config(**kw) -> dict:
    """Set any of _CONFIG's keys; returns the previous configuration."""
    return update_config(_CONFIG, "ssm-step", kw, int)


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(n))


def _row_blocks(B: int) -> tuple[int, int]:
    bb = min(_CONFIG["max_block_b"], _pow2(B))
    return bb, triton.cdiv(B, bb)


def ssm_step_launch(x, ssm, ring, t, tokens, table, norm_w, in_w, conv_w, conv_b, dt_bias, neg_a, d_skip,
                    mnorm_w, out_w, eps: float, m_eps: float, gather: bool, pdl_safe: bool = True) -> torch.Tensor:
    """The two launches. gather: x is the embedding table and table the in_proj table, both read at the rows
    `tokens` (B,) int64 (norm_w, in_w unused); else x (B, D) with unit inner stride (tokens, table unused).
    ssm (B, H, P, N) fp32 and ring (B, k, DI + 2N), contiguous, updated in place; t (B,) int64; neg_a (H,) fp32;
    weights contiguous, in x's dtype. Returns the block output (B, D). pdl_safe: as lnn_step_launch's."""
    B, D = t.shape[0], x.shape[1]
    DI = out_w.shape[1]
    N = ssm.shape[3]
    P = ssm.shape[2]
    KS = ring.shape[1]
    dev, dt = x.device, x.dtype
    yg = torch.empty((B, DI + 2 * N), device=dev, dtype=dt)
    out = torch.empty((B, D), device=dev, dtype=dt)
    bb, nb = _row_blocks(B)
    ieee = dt == torch.float32 or dev.type != "cuda"
    nw = _CONFIG["num_warps"]
    pdl = pdl_kwargs(dev) if pdl_safe else {"GDC": False}
    bc = _pow2(_CONFIG["scan_block_c"])
    srs = ring.stride(1) if KS else 0
    _ssm_in_scan[(triton.cdiv(DI, bc), nb)](
        x, tokens, table, norm_w, in_w, conv_w, conv_b, ring, ssm, t, dt_bias, neg_a, d_skip, yg,
        B, D, DI, N, P, eps, x.stride(0), table.stride(0), in_w.stride(0), conv_w.stride(0), ring.stride(0), srs,
        ssm.stride(0), yg.stride(0),
        KS=KS, DP=_pow2(D), NB=_pow2(N), BLOCK_C=bc, BLOCK_B=bb, GATHER=gather, IEEE=ieee, num_warps=nw, **pdl)
    bn = _pow2(_CONFIG["out_block_n"])
    _ssm_out[(triton.cdiv(D, bn), nb)](
        x, tokens, yg, mnorm_w, out_w, ring, t, out, B, D, DI, N, m_eps, x.stride(0), yg.stride(0), out_w.stride(0),
        ring.stride(0), srs, out.stride(0),
        KS=KS, DIP=_pow2(DI), NB2=_pow2(2 * N), BLOCK_N=bn, BLOCK_B=bb, GATHER=gather, IEEE=ieee, num_warps=nw, **pdl)
    return out


def entropy_head_launch(h, norm_w, head_w, eps: float) -> torch.Tensor:
    """One launch: h (B, d) with unit inner stride -> entropy bits (B,) fp32 of softmax(head(norm(h)))."""
    B, D = h.shape
    V = head_w.shape[0]
    ent = torch.empty((B,), device=h.device, dtype=torch.float32)
    bb, nb = _row_blocks(B)
    DP = _pow2(D)
    _entropy_head[(nb,)](
        h, norm_w, head_w, ent, B, D, V, eps, h.stride(0), head_w.stride(0),
        DP=DP, VP=_pow2(V), BLOCK_K=min(DP, _pow2(_CONFIG["head_block_k"])), BLOCK_B=bb,
        IEEE=h.dtype == torch.float32 or h.device.type != "cuda", num_warps=_CONFIG["num_warps"],
        **pdl_kwargs(h.device))  # it loads nothing before its wait: PDL is safe whatever the weights
    return ent


# Opaque nodes for torch.compile; mutates_args keeps the SSM state and the ring buffer in place (functionalised
# and re-inplaced by the compiler), so a captured CUDA graph replays into the decoder's own state tensors.
@torch.library.custom_op("ionllama::ssm_block_step", mutates_args=("ssm", "ring"))
def ssm_block_step_op(x: torch.Tensor, ssm: torch.Tensor, ring: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor,
                      table: torch.Tensor, norm_w: torch.Tensor, in_w: torch.Tensor, conv_w: torch.Tensor,
                      conv_b: torch.Tensor, dt_bias: torch.Tensor, neg_a: torch.Tensor, d_skip: torch.Tensor,
                      mnorm_w: torch.Tensor, out_w: torch.Tensor, eps: float, m_eps: float,
                      gather: bool) -> torch.Tensor:
    x = x if x.stride(-1) == 1 else x.contiguous()
    # a weight copied here is written by a kernel of this step: no loading it before the wait (pdl.py)
    pdl_safe = all(w.is_contiguous() for w in (norm_w, in_w, mnorm_w, out_w))
    return ssm_step_launch(x, ssm, ring, t.contiguous(), tokens.contiguous(), table.contiguous(),
                           norm_w.contiguous(), in_w.contiguous(), conv_w.contiguous(), conv_b.contiguous(),
                           dt_bias.contiguous(), neg_a.contiguous(), d_skip.contiguous(), mnorm_w.contiguous(),
                           out_w.contiguous(), eps, m_eps, gather, pdl_safe=pdl_safe)


@ssm_block_step_op.register_fake
def _(x, ssm, ring, t, tokens, table, norm_w, in_w, conv_w, conv_b, dt_bias, neg_a, d_skip, mnorm_w, out_w,
      eps, m_eps, gather):
    return x.new_empty((t.shape[0], x.shape[1]))


@torch.library.custom_op("ionllama::entropy_head_step", mutates_args=())
def entropy_head_step_op(h: torch.Tensor, norm_w: torch.Tensor, head_w: torch.Tensor, eps: float) -> torch.Tensor:
    h = h if h.stride(-1) == 1 else h.contiguous()
    return entropy_head_launch(h, norm_w.contiguous(), head_w.contiguous(), eps)


@entropy_head_step_op.register_fake
def _(h, norm_w, head_w, eps):
    return h.new_empty((h.shape[0],), dtype=torch.float32)


def check_ssm_block_state(block, dtype: torch.dtype, ssm: torch.Tensor, ring: torch.Tensor,
                          neg_a: torch.Tensor) -> None:
    """ValueError unless the kernels can step MambaBlock `block` in `dtype` with this state (what they assume
    about shapes, strides and dtypes); checked once per decoder (local_state.MambaState), not per step."""
    mx = block.mixer
    DI, N, H, P = mx.d_inner, mx.d_state, mx.n_heads, mx.headdim
    problems = []
    if dtype not in SUPPORTED_DTYPES:
        problems.append(f"dtype {dtype} (supported: fp32, bf16, fp16)")
    if any(p.dtype != dtype for p in block.parameters()):
        problems.append(f"weights not all in {dtype}")
    if ssm.dim() != 4 or ssm.shape[1:] != (H, P, N) or ssm.dtype != torch.float32 or not ssm.is_contiguous():
        problems.append(f"ssm state {tuple(ssm.shape)} {ssm.dtype} is not a contiguous (B, {H}, {P}, {N}) fp32 tensor")
    if ring.shape != (ssm.shape[0], mx.conv.kernel - 1, DI + 2 * N) or ring.dtype != dtype or not ring.is_contiguous():
        problems.append(f"conv ring {tuple(ring.shape)} {ring.dtype} is not a contiguous "
                        f"(B, kernel - 1, {DI + 2 * N}) {dtype} tensor")
    if neg_a.shape != (H,) or neg_a.dtype != torch.float32:
        problems.append(f"A {tuple(neg_a.shape)} {neg_a.dtype} is not (H,) fp32")
    if problems:
        raise ValueError("fused entropy-model step: " + "; ".join(problems))


def ssm_block_step(block, x_t: torch.Tensor, ssm: torch.Tensor, ring: torch.Tensor, t: torch.Tensor,
                   neg_a: torch.Tensor, tokens: torch.Tensor | None = None,
                   table: torch.Tensor | None = None) -> torch.Tensor:
    """MambaBlock `block`'s decode step (local_state.MambaState.step) in two kernels: x_t (B, d) at positions
    t (B,) int64 -> x_t + mixer(norm(x_t)) (B, d); the SSM state (B, H, P, N) fp32 and the conv ring
    (B, kernel - 1, d_inner + 2 d_state) are updated in place. neg_a: -exp(A_log) (computed in the model's
    dtype) as fp32. With `table` (256, in_proj out) and `tokens` (B,): x_t is the embedding table (256, d) and
    row b uses x_t[tokens[b]] and in_proj(norm(.)) = table[tokens[b]] (block 0: byte_step_entropy's lookup).
    CUDA tensors, or CPU tensors under TRITON_INTERPRET=1."""
    mx = block.mixer
    gather = table is not None
    if not gather:  # unused by the kernels: any tensors of the right kinds
        tokens, table = t, mx.in_proj.weight
    return ssm_block_step_op(x_t, ssm, ring, t, tokens, table, block.norm.weight, mx.in_proj.weight,
                             mx.conv.weight[:, 0], mx.conv.bias, mx.dt_bias, neg_a, mx.D, mx.norm.weight,
                             mx.out_proj.weight, float(block.norm.eps), float(mx.norm.eps), gather)


def entropy_head_step(norm, head, h: torch.Tensor) -> torch.Tensor:
    """_entropy_bits_step(head(norm(h))) in one kernel: h (B, d) -> entropy bits (B,) fp32. norm: an RMSNorm,
    head: a bias-free Linear (d -> V), weights in h's dtype."""
    return entropy_head_step_op(h, norm.weight, head.weight, float(norm.eps))
