"""Selective state-space layers (Mamba-2 style) for the entropy model and the MambaByte baseline.

Per head h the state S (P x N) follows  S_t = exp(dt_t * A_h) S_{t-1} + (dt_t x_t) B_t^T,
y_t = S_t C_t + D x_t, with dt, B, C computed from the input (selective). `ssd_chunked` computes
this exactly in O(T) with the state-space-duality chunked form: inside a chunk of L steps it is a
masked (L x L) product (matmuls), across chunks the chunk-end states follow the same recurrence,
solved by `scan_general`. `ssd_step` is one step for incremental decoding; tests compare both
with a naive loop over time (tests/test_components.py).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .common import RMSNorm
from .conv import CausalDepthwiseConv
from .scan import _pad_time, scan_general


def ssd_chunked(x: torch.Tensor, log_a: torch.Tensor, Bm: torch.Tensor, Cm: torch.Tensor, chunk: int = 64,
                h0: torch.Tensor | None = None):
    """x: (b, T, H, P) (already scaled by dt), log_a: (b, T, H) <= 0, Bm/Cm: (b, T, N),
    h0: (b, H, P, N). Returns y (b, T, H, P) and the final state (b, H, P, N)."""
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
    causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()[..., None]
    decay = torch.exp((cum[:, :, :, None] - cum[:, :, None, :]).masked_fill(~causal, float("-inf")))  # (b,n,i,j,H)
    scores = torch.einsum("bcis,bcjs->bcij", Cc, Bc)
    y_diag = torch.einsum("bcij,bcijh,bcjhp->bcihp", scores, decay, x)
    decay_to_end = torch.exp(cum[:, :, -1:] - cum)  # (b, n, L, H)
    states = torch.einsum("bcjs,bcjh,bcjhp->bchps", Bc, decay_to_end, x)  # chunk-local end states
    H_end = scan_general(cum[:, :, -1][..., None, None], states, h0, chunk=16)  # (b, n, H, P, N)
    first = h0.to(work)[:, None] if h0 is not None else torch.zeros_like(H_end[:, :1])
    prev = torch.cat([first, H_end[:, :-1]], dim=1)
    y_off = torch.einsum("bcis,bchps,bcih->bcihp", Cc, prev, torch.exp(cum))
    y = (y_diag + y_off).reshape(b, n * L, H, P)[:, :T]
    return y.to(out_dtype), H_end[:, -1]


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
        y, state = ssd_chunked(x * dt[..., None].to(x.dtype), log_a, Bm, Cm, self.chunk)
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
