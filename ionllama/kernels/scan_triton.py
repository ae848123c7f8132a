"""IntegralLNN scan in Triton: h_t = a * h_{t-1} + u_t with a per-channel constant decay a = exp(log_a).

One program owns one batch row and BLOCK_D channels and walks the whole sequence in tiles of BLOCK_T
steps: inside a tile an associative scan over (decay, value) pairs, across tiles a carried state.
Every element of u is read once and every h written once (fp32 accumulation), so the forward moves
2 tensors and the backward 3 (dy and h_{t-1} in, du out): 5 tensors of B*T*D for fwd+bwd.

Backward (reverse scan):  g_t = dy_t + a g_{t+1},  du_t = g_t,  dh0 = a g_0,
dlog_a = a * sum_{b,t} g_t h_{t-1}  (h_{-1} = h0 or 0). The backward walks the tiles from the end and
loads each tile's rows in reverse order, so the same forward associative scan does the reverse scan.

The oracle is ``ionllama.model.scan.scan_const_decay``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _affine_combine(a1, x1, a2, x2):
    # (x -> a1 x + x1) followed by (x -> a2 x + x2)
    return a1 * a2, a2 * x1 + x2


@triton.jit
def _scan_fwd(U, LOG_A, H0, HOUT, T, D, sub, sut, shb, sht,
              HAS_H0: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr):
    b = tl.program_id(0)
    pid_d = tl.program_id(1)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    if EVEN_D:  # a mask constant along the channels keeps the loads 16-byte wide
        col_ok = tl.full([BLOCK_D], 1, tl.int1)
    a = tl.exp(tl.load(LOG_A + cols, mask=col_ok, other=0.0).to(tl.float32))
    if HAS_H0:
        h = tl.load(H0 + b * D + cols, mask=col_ok, other=0.0).to(tl.float32)
    else:
        h = tl.zeros([BLOCK_D], tl.float32)
    steps = tl.arange(0, BLOCK_T)
    decay = tl.zeros([BLOCK_T, BLOCK_D], tl.float32) + a[None, :]
    is_last = (steps == BLOCK_T - 1)[:, None]
    u_base = U + b * sub
    h_base = HOUT + b * shb
    for t0 in range(0, T, BLOCK_T):
        rows = t0 + steps
        mask = (rows < T)[:, None] & col_ok[None, :]
        u = tl.load(u_base + rows[:, None] * sut + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        a_cum, x = tl.associative_scan((decay, u), 0, _affine_combine)  # a^(t+1), local scan
        hs = x + a_cum * h[None, :]
        tl.store(h_base + rows[:, None] * sht + cols[None, :], hs.to(HOUT.dtype.element_ty), mask=mask)
        h = tl.sum(tl.where(is_last, hs, 0.0), 0)


@triton.jit
def _scan_bwd(DY, HOUT, LOG_A, H0, DU, DLA, DH0, T, D, sdb, sdt, shb, sht, sub, sut,
              HAS_H0: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr):
    b = tl.program_id(0)
    pid_d = tl.program_id(1)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    if EVEN_D:  # a mask constant along the channels keeps the loads 16-byte wide
        col_ok = tl.full([BLOCK_D], 1, tl.int1)
    a = tl.exp(tl.load(LOG_A + cols, mask=col_ok, other=0.0).to(tl.float32))
    if HAS_H0:
        h0 = tl.load(H0 + b * D + cols, mask=col_ok, other=0.0).to(tl.float32)
    steps = tl.arange(0, BLOCK_T)
    decay = tl.zeros([BLOCK_T, BLOCK_D], tl.float32) + a[None, :]
    is_last = (steps == BLOCK_T - 1)[:, None]
    carry = tl.zeros([BLOCK_D], tl.float32)  # g at the step after the current tile
    dla = tl.zeros([BLOCK_D], tl.float32)
    n_tiles = tl.cdiv(T, BLOCK_T)
    for it in range(0, n_tiles):
        rows = (n_tiles - 1 - it) * BLOCK_T + (BLOCK_T - 1 - steps)  # descending time
        row_ok = rows < T
        mask = row_ok[:, None] & col_ok[None, :]
        dy = tl.load(DY + b * sdb + rows[:, None] * sdt + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        a_cum, x = tl.associative_scan((decay, dy), 0, _affine_combine)
        g = x + a_cum * carry[None, :]
        tl.store(DU + b * sub + rows[:, None] * sut + cols[None, :], g.to(DU.dtype.element_ty), mask=mask)
        prev_mask = (row_ok & (rows >= 1))[:, None] & col_ok[None, :]
        h_prev = tl.load(HOUT + b * shb + (rows - 1)[:, None] * sht + cols[None, :], mask=prev_mask,
                         other=0.0).to(tl.float32)
        if HAS_H0:
            h_prev = tl.where((rows == 0)[:, None], h0[None, :], h_prev)
        dla += tl.sum(g * h_prev, 0)
        carry = tl.sum(tl.where(is_last, g, 0.0), 0)  # g at the tile's first (earliest) step
    tl.store(DLA + b * D + cols, dla * a, mask=col_ok)
    tl.store(DH0 + b * D + cols, carry * a, mask=col_ok)


# Defaults chosen from the H100 sweep in benchmarks/bench_scan.py (docs/notes/kernels-notes.md).
_CONFIG = {"block_t": 64, "block_d": 32, "num_warps": 4}


def set_scan_config(**kw) -> dict:
    """Set block_t, block_d, num_warps for both scan kernels. Returns the previous configuration."""
    old = dict(_CONFIG)
    for key, val in kw.items():
        if key not in _CONFIG:
            raise KeyError(f"unknown scan config key {key!r}")
        _CONFIG[key] = int(val)
    return old


def _grid(B, D):
    return (B, triton.cdiv(D, _CONFIG["block_d"]))


def scan_forward(u, log_a, h0):
    B, T, D = u.shape
    h = torch.empty((B, T, D), dtype=u.dtype, device=u.device)
    _scan_fwd[_grid(B, D)](u, log_a, h0 if h0 is not None else log_a, h, T, D,
                           u.stride(0), u.stride(1), h.stride(0), h.stride(1),
                           HAS_H0=h0 is not None, BLOCK_T=_CONFIG["block_t"], BLOCK_D=_CONFIG["block_d"],
                           EVEN_D=D % _CONFIG["block_d"] == 0,
                           num_warps=_CONFIG["num_warps"])
    return h


def scan_backward(dy, h, log_a, h0):
    B, T, D = dy.shape
    du = torch.empty((B, T, D), dtype=dy.dtype, device=dy.device)
    dla = torch.empty((B, D), dtype=torch.float32, device=dy.device)
    dh0 = torch.empty((B, D), dtype=torch.float32, device=dy.device)
    _scan_bwd[_grid(B, D)](dy, h, log_a, h0 if h0 is not None else log_a, du, dla, dh0, T, D,
                           dy.stride(0), dy.stride(1), h.stride(0), h.stride(1), du.stride(0), du.stride(1),
                           HAS_H0=h0 is not None, BLOCK_T=_CONFIG["block_t"], BLOCK_D=_CONFIG["block_d"],
                           EVEN_D=D % _CONFIG["block_d"] == 0,
                           num_warps=_CONFIG["num_warps"])
    return du, dla.sum(0), dh0


class ScanConstDecayFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, log_a, h0):
        u = u if u.stride(-1) == 1 else u.contiguous()
        la = log_a.contiguous()
        h0c = h0.contiguous() if h0 is not None else None
        h = scan_forward(u, la, h0c)
        ctx.save_for_backward(h, la, h0c)
        ctx.log_a_dtype = log_a.dtype
        return h

    @staticmethod
    def backward(ctx, dy):
        h, la, h0 = ctx.saved_tensors
        dy = dy if dy.stride(-1) == 1 else dy.contiguous()
        du, dla, dh0 = scan_backward(dy, h, la, h0)
        dh0_out = dh0.to(h0.dtype) if (h0 is not None and ctx.needs_input_grad[2]) else None
        return du, dla.to(ctx.log_a_dtype), dh0_out


def scan_const_decay_triton(u: torch.Tensor, log_a: torch.Tensor, h0: torch.Tensor | None = None) -> torch.Tensor:
    """Triton scan (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1); same contract as the reference:
    u (B, T, D), log_a (D,) <= 0, h0 (B, D) or None -> h (B, T, D) in u's dtype."""
    return ScanConstDecayFn.apply(u, log_a, h0)
