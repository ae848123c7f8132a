"""One decode step of an IntegralLNNBlock in four Triton kernels (forward only, small batches).

Why: batch-1 generation is GPU-bound on kernel count (issue #4): compiled, a block's byte step is ~13 kernels
(norms, elementwise, the in_proj / out_proj / FFN GEMVs). Here a step is four launches:

  K1 _lnn_in_gate:  RMSNorm(x) -> in_proj rows of a channel block (gate g, candidate c, output gate o) ->
                    the causal depthwise conv step of g and c over the ring buffer -> h = decay h + sigmoid(g) c
                    (h fp32, in place) -> o; then the new (g, c) inputs go into the ring slot t % k (in place).
  K2 _lnn_out_mix:  state_norm(h) * silu(o) -> out_proj rows of a channel block -> x1 = x + that.
  K3 _lnn_ffn_up:   norm2(x1) -> SwiGLU w_in rows of a hidden block, gate (first `hidden` rows) and value
                    (next `hidden` rows) -> u = silu(gate) * value.
  K4 _lnn_ffn_down: w_out rows of a channel block over u (K loop over the hidden width) -> out = x1 + that.

After the decoder's last block, `_byte_head` can run the model's head, logits = head(norm(x)), as one launch where the
compiled decoder runs an RMSNorm kernel and a library GEMV (`head_block_n` > 0, the default; 0: the PyTorch head).
Measured (H100, bf16, batch 1, default compile; docs/results/checks-s58.md): byte graph 0.078-0.080 against
0.081-0.084 ms, 9,613-9,692 against 9,259-9,545 bytes/s from 1K to 32K, five processes alternating (PyTorch head
first). Why it pays more than its one launch: under the runner's overlapped latent step a patch of n bytes costs about
n - 1 byte steps plus the latent step (the latent step hides behind only one byte), so a byte step's time counts n - 1
times a patch, the latent step's once (docs/results/checks-s57.md).

On Hopper each kernel launches with PDL (pdl.py): it loads its weight tiles while the previous kernel is still
running, then waits for it. (A one-launch form, the four stages meeting at grid barriers, was measured slower
on an H200 and removed: byte graph 0.130 vs 0.107 ms; docs/results/decode-levers-s11/.)

Grid of each kernel: (output channel blocks, batch row blocks). Every program recomputes the norm of its whole
rows (d is small: the row is one tile); a GEMV is ``tl.dot`` of the rows (padded to BLOCK_B >= 16, the MMA
minimum) with the program's weight rows, fp32 accumulation (fp32 models: input_precision ieee, not tf32; under
the CPU interpreter the operands are upcast to fp32, see _rows_times_wt).

Ring buffer (as local_state.RingConv): buf (B, k, 2D), k = conv kernel - 1, holds the input of byte p in
slot p % k; at step t slot s is multiplied by conv weight tap (s - t) mod k (tap k multiplies the new input),
and after all reads the new input replaces slot t % k. t is per row (B,) int64.

Dtypes follow IntegralState.step run eagerly in the model's dtype (bf16 / fp16 / fp32; weights, x and the
ring in that dtype, h and decay fp32): every tensor the PyTorch path materialises in the activation dtype (the
normalised inputs, the GEMV outputs, each conv product and partial sum, sigmoid(g), sigmoid(g) c, h cast for
state_norm, silu(o), the residual sums) is rounded to it here too (round to nearest even), with fp32 arithmetic
and fp32 GEMV accumulation in between. So low-precision results differ from the eager PyTorch path only by the
order of the fp32 sums (under the CPU interpreter bf16 outputs came out bit-identical); a compiled PyTorch step
rounds less often than either.

The reference is ``ionllama.generation.local_state.IntegralState.step`` (checked by
``ionllama.kernels.selfcheck`` kind "lnn_step"). Block sizes: from one launch-config sweep on an H200 (_CONFIG).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch_config import update_config
from .pdl import gdc_launch, gdc_wait, pdl_kwargs


@triton.jit
def _round(x, DT: tl.constexpr):
    """fp32 x rounded to the nearest (ties to even) value of dtype DT, returned in fp32 (a no-op for fp32).
    bf16 by bit arithmetic: Triton's CPU interpreter (triton 3.9) truncates fp32 -> bf16 casts, where the GPU
    and PyTorch round to nearest; the bit form gives the same values on both (finite inputs)."""
    if DT == tl.bfloat16:
        b = x.to(tl.int32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & -65536
        return b.to(tl.float32, bitcast=True)
    elif DT == tl.float32:
        return x
    else:
        return x.to(DT).to(tl.float32)


@triton.jit
def _cast(x, DT: tl.constexpr):
    """fp32 x -> dtype DT, rounded to nearest (the cast itself is then exact, interpreter or GPU)."""
    return _round(x, DT).to(DT)


@triton.jit
def _rms_rows(x, w, eps, D, DT: tl.constexpr):
    """RMSNorm of fp32 rows x (BLOCK_B, DP) (padding columns 0) as common.RMSNorm in dtype DT:
    (x * rsqrt(mean(x^2) + eps)).to(DT) * weight, the product rounded to DT. Returns fp32."""
    ms = tl.sum(x * x, 1) / D
    xn = _round(x * tl.rsqrt(ms + eps)[:, None], DT)
    return _round(xn * w[None, :], DT)


@triton.jit
def _rows_times_wt(a, w, IEEE: tl.constexpr):
    """a (BLOCK_B, K) @ w (N, K)^T -> (BLOCK_B, N) with fp32 accumulation. IEEE: operands as fp32, full fp32
    products (fp32 models, where the default would be tf32; and Triton's CPU interpreter, whose tl.dot gives
    garbage for bf16 operands in triton 3.9: bf16 / fp16 values are exact in fp32, so only the summation order
    differs from the tensor-core dot)."""
    if IEEE:
        return tl.dot(a.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
    else:
        return tl.dot(a, tl.trans(w))


@triton.jit
def _tile_at(pid_n, pid_b, B, N, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr):
    """Batch rows of row block pid_b and output channels of channel block pid_n, with their bounds masks."""
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return rows, rows < B, rows.to(tl.int64), n, n < N


@triton.jit
def _tile(B, N, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's batch rows (grid axis 1) and output channels (axis 0), with their bounds masks."""
    return _tile_at(tl.program_id(0), tl.program_id(1), B, N, BLOCK_B, BLOCK_N)


@triton.jit
def _sync(SYNC: tl.constexpr):
    """Where a stage may start reading what earlier kernels wrote. SYNC 0: nothing (plain launch);
    1: programmatic dependent launch (wait for the previous kernel, then let the next one launch)."""
    if SYNC == 1:
        gdc_wait(True)
        gdc_launch(True)


@triton.jit
def _in_gate_stage(pid_n, pid_b, X, NW, WIN, CW, CB, RING, H, DECAY, T, O,
                   B, D, eps, sxb, swin, scw, srb, srs, shb, sob,
                   KS: tl.constexpr, DP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr,
                   IEEE: tl.constexpr, SYNC: tl.constexpr):
    DT = O.dtype.element_ty
    rows, row_ok, rows64, n, n_ok = _tile_at(pid_n, pid_b, B, D, BLOCK_B, BLOCK_N)
    k = tl.arange(0, DP)
    k_ok = k < D
    m_rk = row_ok[:, None] & k_ok[None, :]
    m_rn = row_ok[:, None] & n_ok[None, :]
    m_nk = n_ok[:, None] & k_ok[None, :]

    # parameters first (pdl.py: loaded before the previous kernel has finished)
    nw = tl.load(NW + k, mask=k_ok, other=0.0).to(tl.float32)
    w_rows = WIN + n[:, None].to(tl.int64) * swin + k[None, :]
    w_g = tl.load(w_rows, mask=m_nk, other=0.0)
    w_c = tl.load(w_rows + D * swin, mask=m_nk, other=0.0)
    w_o = tl.load(w_rows + 2 * D * swin, mask=m_nk, other=0.0)
    wg = CW + n * scw  # gate channel n, candidate channel D + n: rows of the (2D, KS + 1) weight
    wc = CW + (D + n) * scw
    tap_g = tl.load(wg + KS, mask=n_ok, other=0.0).to(tl.float32)
    tap_c = tl.load(wc + KS, mask=n_ok, other=0.0).to(tl.float32)
    bias_g = tl.load(CB + n, mask=n_ok, other=0.0).to(tl.float32)
    bias_c = tl.load(CB + D + n, mask=n_ok, other=0.0).to(tl.float32)
    _sync(SYNC)

    x = tl.load(X + rows64[:, None] * sxb + k[None, :], mask=m_rk, other=0.0).to(tl.float32)
    a = _rms_rows(x, nw, eps, D, DT).to(DT)
    g_in = _round(_rows_times_wt(a, w_g, IEEE), DT)
    c_in = _round(_rows_times_wt(a, w_c, IEEE), DT)
    o = _rows_times_wt(a, w_o, IEEE)

    # conv step, rounded as RingConv's eager ops: (sum over ring slots s of buf[s] * tap (s - t) mod KS)
    # + new input * tap KS + bias, every product and partial sum in DT (the slot sum itself in fp32)
    g = _round(g_in * tap_g[None, :], DT)
    c = _round(c_in * tap_c[None, :], DT)
    ring = RING + rows64[:, None] * srb + n[None, :]
    if KS > 0:
        t_mod = tl.load(T + rows, mask=row_ok, other=0) % KS  # t >= 0
        g_ring = tl.zeros([BLOCK_B, BLOCK_N], tl.float32)
        c_ring = tl.zeros([BLOCK_B, BLOCK_N], tl.float32)
        for s in tl.static_range(KS):
            tap = ((s - t_mod + KS) % KS)[:, None]
            wgs = tl.load(wg[None, :] + tap, mask=m_rn, other=0.0).to(tl.float32)
            wcs = tl.load(wc[None, :] + tap, mask=m_rn, other=0.0).to(tl.float32)
            g_ring += _round(tl.load(ring + s * srs, mask=m_rn, other=0.0).to(tl.float32) * wgs, DT)
            c_ring += _round(tl.load(ring + s * srs + D, mask=m_rn, other=0.0).to(tl.float32) * wcs, DT)
        g = _round(_round(g_ring, DT) + g, DT)
        c = _round(_round(c_ring, DT) + c, DT)
    g = _round(g + bias_g[None, :], DT)
    c = _round(c + bias_c[None, :], DT)
    u = _round(_round(tl.sigmoid(g), DT) * c, DT)
    h_ptr = H + rows64[:, None] * shb + n[None, :]
    h = tl.load(DECAY + n, mask=n_ok, other=0.0)[None, :] * tl.load(h_ptr, mask=m_rn, other=0.0) + u
    tl.store(h_ptr, h, mask=m_rn)
    tl.store(O + rows64[:, None] * sob + n[None, :], _cast(o, DT), mask=m_rn)
    if KS > 0:
        tl.debug_barrier()  # every thread's ring reads are done before the slot is overwritten
        slot = ring + (t_mod * srs)[:, None]
        tl.store(slot, g_in.to(RING.dtype.element_ty), mask=m_rn)
        tl.store(slot + D, c_in.to(RING.dtype.element_ty), mask=m_rn)


@triton.jit
def _out_mix_stage(pid_n, pid_b, X, H, O, SNW, WOUT, X1, B, D, eps, sxb, shb, sob, swo, sx1b,
                   DP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr, IEEE: tl.constexpr,
                   SYNC: tl.constexpr):
    DT = X1.dtype.element_ty
    rows, row_ok, rows64, n, n_ok = _tile_at(pid_n, pid_b, B, D, BLOCK_B, BLOCK_N)
    k = tl.arange(0, DP)
    k_ok = k < D
    m_rk = row_ok[:, None] & k_ok[None, :]
    m_rn = row_ok[:, None] & n_ok[None, :]

    snw = tl.load(SNW + k, mask=k_ok, other=0.0).to(tl.float32)  # parameters before the wait (pdl.py)
    w = tl.load(WOUT + n[:, None].to(tl.int64) * swo + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
    _sync(SYNC)
    h = _round(tl.load(H + rows64[:, None] * shb + k[None, :], mask=m_rk, other=0.0), DT)  # h.to(x.dtype)
    hn = _rms_rows(h, snw, eps, D, DT)
    o = tl.load(O + rows64[:, None] * sob + k[None, :], mask=m_rk, other=0.0).to(tl.float32)
    a = _cast(hn * _round(o * tl.sigmoid(o), DT), DT)
    y = _round(_rows_times_wt(a, w, IEEE), DT)
    x = tl.load(X + rows64[:, None] * sxb + n[None, :], mask=m_rn, other=0.0).to(tl.float32)
    tl.store(X1 + rows64[:, None] * sx1b + n[None, :], _cast(x + y, DT), mask=m_rn)


@triton.jit
def _ffn_up_stage(pid_n, pid_b, X1, NW, WIN, U, B, D, HID, eps, sx1b, swin, sub,
                  DP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr, IEEE: tl.constexpr,
                  SYNC: tl.constexpr):
    DT = U.dtype.element_ty
    rows, row_ok, rows64, n, n_ok = _tile_at(pid_n, pid_b, B, HID, BLOCK_B, BLOCK_N)
    k = tl.arange(0, DP)
    k_ok = k < D
    m_nk = n_ok[:, None] & k_ok[None, :]

    nw = tl.load(NW + k, mask=k_ok, other=0.0).to(tl.float32)  # parameters before the wait (pdl.py)
    w_rows = WIN + n[:, None].to(tl.int64) * swin + k[None, :]
    w_gate = tl.load(w_rows, mask=m_nk, other=0.0)
    w_val = tl.load(w_rows + HID * swin, mask=m_nk, other=0.0)
    _sync(SYNC)
    x = tl.load(X1 + rows64[:, None] * sx1b + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
    a = _rms_rows(x.to(tl.float32), nw, eps, D, DT).to(DT)
    gate = _round(_rows_times_wt(a, w_gate, IEEE), DT)
    val = _round(_rows_times_wt(a, w_val, IEEE), DT)
    u = _round(gate * tl.sigmoid(gate), DT) * val
    tl.store(U + rows64[:, None] * sub + n[None, :], _cast(u, DT), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _ffn_down_stage(pid_n, pid_b, X1, U, WOUT, OUT, B, D, HID, sx1b, sub, swo, soutb,
                    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr, IEEE: tl.constexpr,
                    SYNC: tl.constexpr):
    DT = OUT.dtype.element_ty
    rows, row_ok, rows64, n, n_ok = _tile_at(pid_n, pid_b, B, D, BLOCK_B, BLOCK_N)
    m_rn = row_ok[:, None] & n_ok[None, :]
    acc = tl.zeros([BLOCK_B, BLOCK_N], tl.float32)
    # the first K step's weights before the wait (pdl.py); each later step's in the loop
    kk = tl.arange(0, BLOCK_K)
    w_row = WOUT + n[:, None].to(tl.int64) * swo
    w = tl.load(w_row + kk[None, :], mask=n_ok[:, None] & (kk < HID)[None, :], other=0.0)
    _sync(SYNC)
    for k0 in range(0, HID, BLOCK_K):
        k = k0 + kk
        k_ok = k < HID
        if k0 > 0:
            w = tl.load(w_row + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        u = tl.load(U + rows64[:, None] * sub + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        acc += _rows_times_wt(u, w, IEEE)
    x1 = tl.load(X1 + rows64[:, None] * sx1b + n[None, :], mask=m_rn, other=0.0).to(tl.float32)
    tl.store(OUT + rows64[:, None] * soutb + n[None, :], _cast(x1 + _round(acc, DT), DT), mask=m_rn)


# The four kernels (one stage each; GDC: launched with PDL).
@triton.jit
def _lnn_in_gate(X, NW, WIN, CW, CB, RING, H, DECAY, T, O,
                 B, D, eps, sxb, swin, scw, srb, srs, shb, sob,
                 KS: tl.constexpr, DP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr,
                 IEEE: tl.constexpr, GDC: tl.constexpr):
    _in_gate_stage(tl.program_id(0), tl.program_id(1), X, NW, WIN, CW, CB, RING, H, DECAY, T, O,
                   B, D, eps, sxb, swin, scw, srb, srs, shb, sob,
                   KS, DP, BLOCK_N, BLOCK_B, IEEE, 1 if GDC else 0)


@triton.jit
def _lnn_out_mix(X, H, O, SNW, WOUT, X1, B, D, eps, sxb, shb, sob, swo, sx1b,
                 DP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr, IEEE: tl.constexpr,
                 GDC: tl.constexpr):
    _out_mix_stage(tl.program_id(0), tl.program_id(1), X, H, O, SNW, WOUT, X1, B, D, eps, sxb, shb, sob, swo, sx1b,
                   DP, BLOCK_N, BLOCK_B, IEEE, 1 if GDC else 0)


@triton.jit
def _lnn_ffn_up(X1, NW, WIN, U, B, D, HID, eps, sx1b, swin, sub,
                DP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr, IEEE: tl.constexpr,
                GDC: tl.constexpr):
    _ffn_up_stage(tl.program_id(0), tl.program_id(1), X1, NW, WIN, U, B, D, HID, eps, sx1b, swin, sub,
                  DP, BLOCK_N, BLOCK_B, IEEE, 1 if GDC else 0)


@triton.jit
def _lnn_ffn_down(X1, U, WOUT, OUT, B, D, HID, sx1b, sub, swo, soutb,
                  BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr, IEEE: tl.constexpr,
                  GDC: tl.constexpr):
    _ffn_down_stage(tl.program_id(0), tl.program_id(1), X1, U, WOUT, OUT, B, D, HID, sx1b, sub, swo, soutb,
                    BLOCK_K, BLOCK_N, BLOCK_B, IEEE, 1 if GDC else 0)


@triton.jit
def _byte_head(X, NW, WH, OUT, B, D, V, eps, sxb, swh, sob,
               DP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr, IEEE: tl.constexpr,
               GDC: tl.constexpr):
    """The decoder's head after its last block: logits = head(norm(x)) for a block of the V outputs (one launch
    where the compiled decoder runs an RMSNorm kernel and a library GEMV), rounded as the PyTorch ops round."""
    DT = OUT.dtype.element_ty
    rows, row_ok, rows64, n, n_ok = _tile(B, V, BLOCK_B, BLOCK_N)
    k = tl.arange(0, DP)
    k_ok = k < D
    nw = tl.load(NW + k, mask=k_ok, other=0.0).to(tl.float32)  # parameters before the wait (pdl.py)
    w = tl.load(WH + n[:, None].to(tl.int64) * swh + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
    _sync(1 if GDC else 0)
    x = tl.load(X + rows64[:, None] * sxb + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
    a = _rms_rows(x.to(tl.float32), nw, eps, D, DT).to(DT)
    y = _rows_times_wt(a, w, IEEE)
    tl.store(OUT + rows64[:, None] * sob + n[None, :], _cast(y, DT), mask=row_ok[:, None] & n_ok[None, :])


# Output channels per program of each kernel (K1 and K2, K4: of d; K3: of the SwiGLU hidden width), K4's
# step over the hidden width, warps. Rows per program: 16 (the tl.dot minimum) up to 32 (max_block_b).
# Set from the one launch-config sweep so far (H200, `small`, batch 1, bf16; 25 points, each point's bytes equal
# to the previous default's): 32 channels per program, K4's step 256 -> byte graph 0.1219 ms vs 0.1273 ms for
# the previous 16 / 128 (5,523 vs 5,384 bytes/s). docs/results/decode-profile-s9/sweep_lnn/sweep_lnn.md
# head_block_n: the decoder's head (norm + GEMV, _byte_head) as one launch of this many logits a program (32: the one
# value measured, faster than the PyTorch head, docs/results/checks-s58.md); 0: the PyTorch head.
_CONFIG = {"in_block_n": 32, "out_block_n": 32, "up_block_n": 32, "down_block_n": 32, "down_block_k": 256,
           "max_block_b": 32, "num_warps": 4, "head_block_n": 32}

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def set_lnn_step_config(**kw) -> dict:
    """Set any of _CONFIG's keys; returns the previous configuration."""
    return update_config(_CONFIG, "lnn-step", kw, int)


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(n))


def lnn_step_launch(x, h, ring, t, decay, norm1_w, in_w, conv_w, conv_b, state_norm_w, out_w, norm2_w,
                    ffn_in_w, ffn_out_w, eps1: float, eps_state: float, eps2: float,
                    pdl_safe: bool = True) -> torch.Tensor:
    """The four launches. x (B, D) with unit inner stride; h (B, D) fp32 and ring (B, k, 2D), updated in
    place; t (B,) int64; decay (D,) fp32; weights contiguous, in x's dtype. Returns the block output (B, D).
    pdl_safe: no kernel of this step writes the weights (pdl.py; False when they were just copied)."""
    B, D = x.shape
    HID = ffn_out_w.shape[1]
    KS = ring.shape[1]
    dev, dt = x.device, x.dtype
    o = torch.empty((B, D), device=dev, dtype=dt)
    x1 = torch.empty((B, D), device=dev, dtype=dt)
    u = torch.empty((B, HID), device=dev, dtype=dt)
    out = torch.empty((B, D), device=dev, dtype=dt)
    bb = min(_CONFIG["max_block_b"], _pow2(B))
    nb = triton.cdiv(B, bb)
    DP = _pow2(D)
    ieee = dt == torch.float32 or x.device.type != "cuda"
    nw = _CONFIG["num_warps"]
    pdl = pdl_kwargs(x.device) if pdl_safe else {"GDC": False}
    bn = _CONFIG["in_block_n"]
    _lnn_in_gate[(triton.cdiv(D, bn), nb)](
        x, norm1_w, in_w, conv_w, conv_b, ring, h, decay, t, o, B, D, eps1, x.stride(0), in_w.stride(0),
        conv_w.stride(0), ring.stride(0), ring.stride(1) if KS else 0, h.stride(0), o.stride(0),
        KS=KS, DP=DP, BLOCK_N=bn, BLOCK_B=bb, IEEE=ieee, num_warps=nw, **pdl)
    bn = _CONFIG["out_block_n"]
    _lnn_out_mix[(triton.cdiv(D, bn), nb)](
        x, h, o, state_norm_w, out_w, x1, B, D, eps_state, x.stride(0), h.stride(0), o.stride(0), out_w.stride(0),
        x1.stride(0), DP=DP, BLOCK_N=bn, BLOCK_B=bb, IEEE=ieee, num_warps=nw, **pdl)
    bn = _CONFIG["up_block_n"]
    _lnn_ffn_up[(triton.cdiv(HID, bn), nb)](
        x1, norm2_w, ffn_in_w, u, B, D, HID, eps2, x1.stride(0), ffn_in_w.stride(0), u.stride(0),
        DP=DP, BLOCK_N=bn, BLOCK_B=bb, IEEE=ieee, num_warps=nw, **pdl)
    bn = _CONFIG["down_block_n"]
    _lnn_ffn_down[(triton.cdiv(D, bn), nb)](
        x1, u, ffn_out_w, out, B, D, HID, x1.stride(0), u.stride(0), ffn_out_w.stride(0), out.stride(0),
        BLOCK_K=max(16, min(_CONFIG["down_block_k"], triton.next_power_of_2(HID))), BLOCK_N=bn, BLOCK_B=bb,
        IEEE=ieee, num_warps=nw, **pdl)
    return out


def byte_head_launch(h, norm_w, head_w, eps: float, pdl_safe: bool = True) -> torch.Tensor:
    """One launch: h (B, d) with unit inner stride -> logits (B, V) = head(norm(h)) in h's dtype; weights
    contiguous, in h's dtype. Channels a program: head_block_n (32 where it is 0: the op was called directly)."""
    B, D = h.shape
    V = head_w.shape[0]
    out = torch.empty((B, V), device=h.device, dtype=h.dtype)
    bb = min(_CONFIG["max_block_b"], _pow2(B))
    bn = _CONFIG["head_block_n"] or 32
    _byte_head[(triton.cdiv(V, bn), triton.cdiv(B, bb))](
        h, norm_w, head_w, out, B, D, V, eps, h.stride(0), head_w.stride(0), out.stride(0), DP=_pow2(D),
        BLOCK_N=bn, BLOCK_B=bb, IEEE=h.dtype == torch.float32 or h.device.type != "cuda",
        num_warps=_CONFIG["num_warps"], **(pdl_kwargs(h.device) if pdl_safe else {"GDC": False}))
    return out


# One opaque node for torch.compile; mutates_args keeps h and the ring buffer in place (functionalised and
# re-inplaced by the compiler), so a captured CUDA graph replays into the decoder's own state tensors.
@torch.library.custom_op("ionllama::lnn_block_step", mutates_args=("h", "ring"))
def lnn_block_step_op(x: torch.Tensor, h: torch.Tensor, ring: torch.Tensor, t: torch.Tensor, decay: torch.Tensor,
                      norm1_w: torch.Tensor, in_w: torch.Tensor, conv_w: torch.Tensor, conv_b: torch.Tensor,
                      state_norm_w: torch.Tensor, out_w: torch.Tensor, norm2_w: torch.Tensor,
                      ffn_in_w: torch.Tensor, ffn_out_w: torch.Tensor, eps1: float, eps_state: float,
                      eps2: float) -> torch.Tensor:
    x = x if x.stride(-1) == 1 else x.contiguous()
    weights = (norm1_w, in_w, conv_w, conv_b, state_norm_w, out_w, norm2_w, ffn_in_w, ffn_out_w)
    # a weight copied here is written by a kernel of this step: no loading it before the wait (pdl.py)
    pdl_safe = all(w.is_contiguous() for w in weights)
    return lnn_step_launch(x, h, ring, t.contiguous(), decay.contiguous(), *(w.contiguous() for w in weights),
                           eps1, eps_state, eps2, pdl_safe=pdl_safe)


@lnn_block_step_op.register_fake
def _(x, h, ring, t, decay, norm1_w, in_w, conv_w, conv_b, state_norm_w, out_w, norm2_w, ffn_in_w, ffn_out_w,
      eps1, eps_state, eps2):
    return x.new_empty(x.shape)


def check_block_state(layer, dtype: torch.dtype, h: torch.Tensor, conv_ring: torch.Tensor,
                      decay: torch.Tensor) -> None:
    """ValueError unless the kernels can step `layer` in `dtype` with this state (what they assume about
    shapes, strides and dtypes); checked once per decoder (IntegralState), not per step."""
    D = layer.dim
    problems = []
    if dtype not in SUPPORTED_DTYPES:
        problems.append(f"dtype {dtype} (supported: fp32, bf16, fp16)")
    if any(p.dtype != dtype for name, p in layer.named_parameters() if name != "decay_logit"):
        problems.append(f"weights not all in {dtype}")
    if h.dim() != 2 or h.shape[1] != D or h.dtype != torch.float32 or not h.is_contiguous():
        problems.append(f"h {tuple(h.shape)} {h.dtype} is not a contiguous (B, {D}) fp32 tensor")
    if conv_ring.shape != (h.shape[0], layer.conv.kernel - 1, 2 * D) or conv_ring.dtype != dtype \
            or not conv_ring.is_contiguous():
        problems.append(f"conv ring {tuple(conv_ring.shape)} {conv_ring.dtype} is not a contiguous "
                        f"(B, kernel - 1, {2 * D}) {dtype} tensor")
    if decay.shape != (D,) or decay.dtype != torch.float32:
        problems.append(f"decay {tuple(decay.shape)} {decay.dtype} is not (D,) fp32")
    if problems:
        raise ValueError("fused IntegralLNN step: " + "; ".join(problems))


def lnn_block_step(layer, x_t: torch.Tensor, h: torch.Tensor, conv_ring: torch.Tensor, t: torch.Tensor,
                   decay: torch.Tensor) -> torch.Tensor:
    """IntegralState.step of IntegralLNNBlock `layer` in four kernels: x_t (B, D) at positions t (B,) int64 ->
    the block output (B, D); h (B, D) fp32 and the conv ring (B, kernel - 1, 2D) are updated in place.
    decay: exp(layer.log_decay()) in fp32 (IntegralState.decay). CUDA tensors, or CPU tensors under
    TRITON_INTERPRET=1."""
    ffn = layer.ffn
    return lnn_block_step_op(x_t, h, conv_ring, t, decay, layer.norm1.weight, layer.in_proj.weight,
                             layer.conv.weight[:, 0], layer.conv.bias, layer.state_norm.weight,
                             layer.out_proj.weight, layer.norm2.weight, ffn.w_in.weight, ffn.w_out.weight,
                             float(layer.norm1.eps), float(layer.state_norm.eps), float(layer.norm2.eps))


@torch.library.custom_op("ionllama::byte_head_step", mutates_args=())
def byte_head_step_op(h: torch.Tensor, norm_w: torch.Tensor, head_w: torch.Tensor, eps: float) -> torch.Tensor:
    h = h if h.stride(-1) == 1 else h.contiguous()
    pdl_safe = norm_w.is_contiguous() and head_w.is_contiguous()  # (a copied weight: no loading it before the wait)
    return byte_head_launch(h, norm_w.contiguous(), head_w.contiguous(), eps, pdl_safe=pdl_safe)


@byte_head_step_op.register_fake
def _(h, norm_w, head_w, eps):
    return h.new_empty((h.shape[0], head_w.shape[0]))


def head_on() -> bool:
    """Is the fused head switched on (head_block_n > 0)? Read when a decoder is built: switching it later changes no
    decoder already built (generate's DecodeSession keys on it)."""
    return _CONFIG["head_block_n"] > 0


def check_byte_head(norm, head, dtype: torch.dtype) -> None:
    """ValueError unless byte_head_step can run this norm and head in `dtype` (checked once per decoder)."""
    if head.bias is not None or norm.weight.dtype != dtype or head.weight.dtype != dtype:
        raise ValueError(f"fused byte head: a bias-free head and norm weights in {dtype} expected")


def byte_head_step(norm, head, h: torch.Tensor) -> torch.Tensor:
    """head(norm(h)) in one kernel: h (B, d) -> logits (B, V) in h's dtype. norm: an RMSNorm, head: a bias-free
    Linear (d -> V), weights in h's dtype (check_byte_head). CUDA tensors, or CPU tensors under
    TRITON_INTERPRET=1."""
    return byte_head_step_op(h, norm.weight, head.weight, float(norm.eps))
