"""Selective state-space layers (Mamba-2 style) for the entropy model and the MambaByte baseline.

Per head h the state S (P x N) follows  S_t = exp(dt_t * A_h) S_{t-1} + (dt_t x_t) B_t^T,
y_t = S_t C_t + D x_t, with dt, B, C computed from the input (selective). `ssd_chunked` computes
this exactly in O(T) with the state-space-duality chunked form: inside a chunk of L steps it is a
masked (L x L) product, across chunks the chunk-end states follow the same recurrence, solved by
`_pass_states` (the chunked form of `scan_general`); every contraction is an explicit batched matmul.
`ssd_step` is one step for incremental decoding; tests compare both with a naive loop over time, values
and gradients (tests/test_components.py).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .common import RMSNorm
from .conv import CausalDepthwiseConv
from .scan import _pad_time


def ssd_chunked(x: torch.Tensor, log_a: torch.Tensor, Bm: torch.Tensor, Cm: torch.Tensor, chunk: int = 64,
                h0: torch.Tensor | None = None):
    """x: (b, T, H, P) (already scaled by dt), log_a: (b, T, H) <= 0, Bm/Cm: (b, T, N),
    h0: (b, H, P, N). Returns y (b, T, H, P) in x's dtype and the final state (b, H, P, N) in the working
    dtype (x's promoted to at least fp32; all the arithmetic is in it).

    Every contraction is a batched matmul over a layout with the contracted dim last / second to last
    (multi-operand einsums here were lowered by inductor to broadcast-multiply + reduction kernels, slow
    in the backward). Per chunk of L steps (n chunks):
      y_diag = (scores * decay) @ x          (b, n, H, L, L) @ (b, n, H, L, P), scores = C B^T
      states = (x * decay_to_end)^T @ B      (b, n, H*P, L) @ (b, n, L, N)
      y_off  = (C @ prev^T) * exp(cum)       (b, n, L, N) @ (b, n, N, H*P)
    and the chunk-end states follow the recurrence H_c = exp(cum_c[-1]) H_{c-1} + states_c, solved by
    `_pass_states` (again matmuls). Work per position: L*H*P (y_diag) + 2*H*P*N (states, y_off) + L*N.
    `chunk` trades the (L x L x H) decay tensor, L*H elements per position, against the chunk states
    (states, H_end, prev: H*P*N each per chunk), ~3*H*P*N/L per position; the sum is smallest near
    L = sqrt(3*P*N): ~28 for P = N = 16 (entropy model), ~110 for P = N = 64 (MambaByte)."""
    b, T, H, P = x.shape
    N = Bm.shape[-1]
    out_dtype = x.dtype
    work = torch.promote_types(x.dtype, torch.float32)
    x, log_a, Bm, Cm = x.to(work), log_a.to(work), Bm.to(work), Cm.to(work)
    L = min(chunk, T)
    n = -(-T // L)
    x = _pad_time(x, n * L).view(b, n, L, H, P)
    la = _pad_time(log_a, n * L).view(b, n, L, H)  # padded steps: decay 1, input 0 -> state unchanged
    Bc = _pad_time(Bm, n * L).view(b, n, L, N)
    Cc = _pad_time(Cm, n * L).view(b, n, L, N)
    cum = la.cumsum(2)  # (b, n, L, H)
    causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
    # seg[i, j] = la_{j+1} + ... + la_i summed from zero (as _pass_states does), not cum_i - cum_j: one step's large
    # decay (a reset, log_a -1e4) made every later difference of two long fp32 sums lose ~1e-4 of the short decays
    la_h = la.transpose(2, 3)  # (b, n, H, L)
    seg = la_h[..., :, None].expand(*la_h.shape, L).masked_fill(~causal.tril(-1), 0.0).cumsum(-2)
    decay = torch.exp(seg.masked_fill(~causal, float("-inf")))  # (b, n, H, i, j)
    scores = Cc @ Bc.transpose(-1, -2)  # (b, n, i, j)
    y_diag = (scores[:, :, None] * decay) @ x.transpose(2, 3)  # (b, n, H, L, P)
    # la_{i+1} + ... + la_L, the exclusive suffix sum, summed directly for the same reason
    to_end = torch.cat([la.flip(2).cumsum(2).flip(2)[:, :, 1:], torch.zeros_like(la[:, :, :1])], dim=2)
    decay_to_end = torch.exp(to_end)  # (b, n, L, H)
    xd = (x * decay_to_end[..., None]).reshape(b, n, L, H * P)
    states = (xd.transpose(-1, -2) @ Bc).view(b, n, H, P * N)  # chunk-local end states
    h0f = h0.to(work).reshape(b, H, P * N) if h0 is not None else None
    H_end = _pass_states(cum[:, :, -1], states, h0f)  # (b, n, H, P*N)
    first = h0f[:, None] if h0f is not None else torch.zeros_like(H_end[:, :1])
    prev = torch.cat([first, H_end[:, :-1]], dim=1).view(b, n, H * P, N)  # state entering each chunk
    y_off = (Cc @ prev.transpose(-1, -2)).view(b, n, L, H, P) * torch.exp(cum)[..., None]
    y = (y_diag.transpose(2, 3) + y_off).reshape(b, n * L, H, P)[:, :T]
    return y.to(out_dtype), H_end[:, -1].view(b, H, P, N)


def _pass_states(log_a: torch.Tensor, u: torch.Tensor, h0: torch.Tensor | None = None, group: int = 16):
    """h_c = exp(log_a_c) h_{c-1} + u_c over the chunk axis. log_a: (b, n, H) <= 0, u: (b, n, H, D),
    h0: (b, H, D) or None -> h (b, n, H, D). `scan_general`'s chunked form with its contraction as a matmul:
    groups of G chunks apply the (G x G) lower-triangular weights exp(la_{j+1} + ... + la_i) per head; the
    group-end states follow the same recurrence over n/G steps, solved recursively. Memory O(n * G * H)
    for the weights, not O(n^2)."""
    b, n, H, D = u.shape
    G = min(group, n)
    m = -(-n // G)
    la = _pad_time(log_a, m * G).view(b, m, G, H).transpose(2, 3)  # (b, m, H, G)
    uu = _pad_time(u, m * G).view(b, m, G, H, D).transpose(2, 3)  # (b, m, H, G, D)
    cum = la.cumsum(-1)
    causal = torch.ones(G, G, dtype=torch.bool, device=u.device).tril()
    # seg[i, j] = la_{j+1} + ... + la_i summed from zero per column (Mamba-2's segsum), not cum_i - cum_j: the
    # difference of two long fp32 sums loses the short decays' precision
    seg = la[..., :, None].expand(*la.shape, G).masked_fill(~causal.tril(-1), 0.0).cumsum(-2)
    W = torch.exp(seg.masked_fill(~causal, float("-inf")))  # (b, m, H, G, G)
    h = W @ uu  # (b, m, H, G, D)
    if m > 1:
        ends = _pass_states(cum[..., -1], h[..., -1, :], h0, group)  # (b, m, H, D)
        first = h0[:, None] if h0 is not None else torch.zeros_like(ends[:, :1])
        carry = torch.cat([first, ends[:, :-1]], dim=1)
    else:
        carry = h0[:, None] if h0 is not None else None
    if carry is not None:
        h = h + torch.exp(cum)[..., None] * carry[:, :, :, None]
    return h.transpose(2, 3).reshape(b, m * G, H, D)[:, :n]


def ssd_step(x_t, log_a_t, B_t, C_t, state):
    """One step. x_t: (b, H, P), log_a_t: (b, H), B_t/C_t: (b, N), state: (b, H, P, N)."""
    state = torch.exp(log_a_t)[..., None, None] * state + x_t[..., None] * B_t[:, None, None, :]
    # a multiply-sum, not einsum (a bmm): torch.compile fuses it with the state update into one kernel
    return (state * C_t[:, None, None, :]).sum(-1), state


class Mamba2Mixer(nn.Module):
    """in_proj -> causal conv on (x, B, C) -> SiLU -> selective SSD scan -> gate by SiLU(z) -> norm -> out_proj."""

    def __init__(self, dim: int, d_state: int = 16, headdim: int = 16, expand: int = 2, conv_kernel: int = 4,
                 chunk: int = 64):
        super().__init__()
        self.d_inner = expand * dim
        assert self.d_inner % headdim == 0
        self.n_heads, self.headdim, self.d_state, self.chunk = self.d_inner // headdim, headdim, d_state, chunk
        self.in_proj = nn.Linear(dim, 2 * self.d_inner + 2 * d_state + self.n_heads, bias=False)
        self.conv = CausalDepthwiseConv(self.d_inner + 2 * d_state, conv_kernel)
        # dt in [1e-3, 1e-1] at init, A in [1, 16] (as in Mamba-2)
        dt = torch.exp(torch.rand(self.n_heads) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        self.A_log = nn.Parameter(torch.log(torch.empty(self.n_heads).uniform_(1, 16)))
        self.D = nn.Parameter(torch.ones(self.n_heads))
        self.norm = RMSNorm(self.d_inner)
        self.out_proj = nn.Linear(self.d_inner, dim, bias=False)

    def _split(self, zxbcdt):
        return torch.split(zxbcdt, [self.d_inner, self.d_inner + 2 * self.d_state, self.n_heads], dim=-1)

    def _ssm_inputs(self, xBC, dt_raw):
        x, Bm, Cm = torch.split(xBC, [self.d_inner, self.d_state, self.d_state], dim=-1)
        dt = F.softplus(dt_raw.to(torch.promote_types(dt_raw.dtype, torch.float32)) + self.dt_bias)  # (..., H)
        log_a = dt * -torch.exp(self.A_log)
        x = x.unflatten(-1, (self.n_heads, self.headdim))
        return x, dt, log_a, Bm, Cm

    def _output(self, y, x, z):
        y = y + self.D[:, None].to(y.dtype) * x
        y = y.flatten(-2) * F.silu(z)
        return self.out_proj(self.norm(y))

    def forward(self, u: torch.Tensor, return_state: bool = False):
        z, xBC, dt_raw = self._split(self.in_proj(u))
        xBC_act = F.silu(self.conv(xBC))
        x, dt, log_a, Bm, Cm = self._ssm_inputs(xBC_act, dt_raw)
        from ..kernels import ssd_scan  # one Triton kernel on CUDA where no gradient is needed, else ssd_chunked
        y, state = ssd_scan(x * dt[..., None].to(x.dtype), log_a, Bm, Cm, self.chunk)
        out = self._output(y.to(u.dtype), x, z)
        if return_state:
            return out, {"conv": self.conv.tail(xBC), "ssm": state}
        return out

    def step(self, u_t: torch.Tensor, cache: dict):
        """u_t: (b, dim). cache: {'conv': (b, k-1, C), 'ssm': (b, H, P, N)} -> (out_t, cache)."""
        return self.step_from_proj(self.in_proj(u_t), cache)

    def step_from_proj(self, zxbcdt: torch.Tensor, cache: dict, conv_step=None):
        """``step`` given in_proj(u_t) (a decoder may look it up from a table instead of a matmul).
        conv_step: xBC -> conv output, for a caller that keeps and updates its own conv buffer (then the
        returned cache has no 'conv')."""
        z, xBC, dt_raw = self._split(zxbcdt)
        if conv_step is None:
            xBC_c, conv_buf = self.conv.step(xBC, cache["conv"])
        else:
            xBC_c, conv_buf = conv_step(xBC), None
        x, dt, log_a, Bm, Cm = self._ssm_inputs(F.silu(xBC_c), dt_raw)
        w = cache["ssm"].dtype
        y, ssm = ssd_step((x * dt[..., None].to(x.dtype)).to(w), log_a.to(w), Bm.to(w), Cm.to(w), cache["ssm"])
        new = {"ssm": ssm} if conv_buf is None else {"conv": conv_buf, "ssm": ssm}
        return self._output(y.to(zxbcdt.dtype), x, z), new

    def empty_cache(self, batch: int, device, dtype=torch.float32) -> dict:
        C = self.d_inner + 2 * self.d_state
        return {"conv": torch.zeros(batch, self.conv.kernel - 1, C, device=device, dtype=dtype),
                "ssm": torch.zeros(batch, self.n_heads, self.headdim, self.d_state, device=device,
                                   dtype=torch.promote_types(dtype, torch.float32))}


class MambaBlock(nn.Module):
    """Pre-norm residual block around a Mamba-2 mixer."""

    def __init__(self, dim: int, **kw):
        super().__init__()
        self.norm = RMSNorm(dim)
        self.mixer = Mamba2Mixer(dim, **kw)

    def forward(self, x, return_state: bool = False):
        if return_state:
            y, st = self.mixer(self.norm(x), return_state=True)
            return x + y, st
        return x + self.mixer(self.norm(x))

    def step(self, x_t, cache):
        y, cache = self.mixer.step(self.norm(x_t), cache)
        return x_t + y, cache
