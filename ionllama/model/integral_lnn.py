"""IntegralLNN: gated, decayed integration over bytes.

    h_t = a ⊙ h_{t-1} + g_t ⊙ c_t,   a = sigmoid(decay_logit) per channel (learned time constants),
    g_t = sigmoid(gate_t), c_t = candidate_t, both from a causal depthwise conv of the input.

The recurrence is an O(T) linear scan (``ionllama.kernels.scan_const_decay``: Triton on CUDA,
chunked PyTorch reference elsewhere), never a T x T matrix or a Python loop over time. Its input
g_t * c_t is one op as well (``ionllama.kernels.causal_conv_gate``: on CUDA a Triton forward and backward
that read the in_proj output in place and keep the conv outputs in registers; the shifted-product
reference elsewhere). A block is
pre-norm: x + out_proj(norm(h) * silu(o)), then x + SwiGLU(norm(x)). Parameters per block:
4 d^2 (in 3 d^2 + out d^2) + FFN, the same as an attention block, so the local-layer ablation
(transformer vs IntegralLNN) compares equal parameter counts.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .common import ResidualDropout, RMSNorm, SwiGLU
from .conv import CausalDepthwiseConv


def _scan(u, log_a, h0=None, chunk=64):
    from ..kernels import scan_const_decay  # Triton on CUDA, chunked reference elsewhere

    return scan_const_decay(u, log_a, h0, chunk=chunk)


def _conv_gate(gc, conv):
    from ..kernels import causal_conv_gate  # Triton on CUDA (conv, gate and their backward in two kernels)

    return causal_conv_gate(gc, conv.weight[:, 0], conv.bias)


class IntegralLNNBlock(nn.Module):
    def __init__(self, dim: int, ffn_hidden: int, conv_kernel: int = 4, chunk: int = 64,
                 min_timescale: float = 2.0, max_timescale: float = 256.0, dropout: float = 0.0):
        super().__init__()
        if not 1.0 < min_timescale <= max_timescale:  # tau 1 is a = 0, a decay logit of -inf; below 1, NaN
            raise ValueError(f"IntegralLNN time constants need 1 < min_timescale <= max_timescale (got "
                             f"{min_timescale}, {max_timescale})")
        self.dim, self.chunk = dim, chunk
        self.norm1 = RMSNorm(dim)
        self.in_proj = nn.Linear(dim, 3 * dim, bias=False)  # gate, candidate, output gate
        self.conv = CausalDepthwiseConv(2 * dim, conv_kernel)
        # time constants tau log-uniform in [min, max] bytes: a = 1 - 1/tau
        tau = torch.exp(torch.linspace(math.log(min_timescale), math.log(max_timescale), dim))
        a = 1.0 - 1.0 / tau
        self.decay_logit = nn.Parameter(torch.log(a) - torch.log1p(-a))
        self.state_norm = RMSNorm(dim)
        self.out_proj = nn.Linear(dim, dim, bias=False)
        self.norm2 = RMSNorm(dim)
        self.ffn = SwiGLU(dim, ffn_hidden)
        self.drop = ResidualDropout(dropout)

    def log_decay(self) -> torch.Tensor:
        return F.logsigmoid(self.decay_logit.to(torch.promote_types(self.decay_logit.dtype, torch.float32)))

    def _mix_out(self, x, h, o):
        x = x + self.drop(self.out_proj(self.state_norm(h.to(x.dtype)) * F.silu(o)))
        return x + self.drop(self.ffn(self.norm2(x)))

    def forward(self, x: torch.Tensor, return_state: bool = False):
        gc, o = self.in_proj(self.norm1(x)).split([2 * self.dim, self.dim], dim=-1)
        h = _scan(_conv_gate(gc, self.conv), self.log_decay(), chunk=self.chunk)  # sigmoid(g) * c, g, c = conv(gc)
        y = self._mix_out(x, h, o)
        if return_state:
            return y, {"conv": self.conv.tail(gc), "h": h[:, -1].to(torch.promote_types(h.dtype, torch.float32))}
        return y

    def step(self, x_t: torch.Tensor, cache: dict, decay: torch.Tensor | None = None):
        """x_t: (B, dim); cache {'conv': (B, k-1, 2 dim), 'h': (B, dim) fp32}. decay: exp(log_decay()),
        if the caller computed it once (a decoder does, instead of 3 ops per byte)."""
        gc, o = self.in_proj(self.norm1(x_t)).split([2 * self.dim, self.dim], dim=-1)
        gc_c, conv_buf = self.conv.step(gc, cache["conv"])
        g, c = gc_c.chunk(2, dim=-1)
        if decay is None:
            decay = torch.exp(self.log_decay())
        h = decay * cache["h"] + (torch.sigmoid(g) * c).to(cache["h"].dtype)
        return self._mix_out(x_t, h, o), {"conv": conv_buf, "h": h}

    def empty_cache(self, batch: int, device, dtype=torch.float32) -> dict:
        return {"conv": torch.zeros(batch, self.conv.kernel - 1, 2 * self.dim, device=device, dtype=dtype),
                "h": torch.zeros(batch, self.dim, device=device, dtype=torch.promote_types(dtype, torch.float32))}


def redraw_local_inputs(blocks, std: float = 0.02) -> None:
    """config.local_init == "inputs": each IntegralLNN block's input projection at N(0, std) and its depthwise conv at
    N(0, 1/kernel), the conv's own init. init_weights' GPT-2 rule scales every weight named *proj as a residual
    output, so it shrank in_proj by 1/sqrt(2 x layers), and it drew the conv at N(0, std). Other blocks (the
    transformer local layers: qkv, not in_proj) are left as they are."""
    with torch.no_grad():
        for block in blocks:
            if isinstance(block, IntegralLNNBlock):
                nn.init.normal_(block.in_proj.weight, 0.0, std)
                block.conv.weight.normal_(0.0, block.conv.kernel ** -0.5)
