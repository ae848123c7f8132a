"""Latent transformer over patches: pre-norm, RoPE, SwiGLU; dilated (O(n log n)) or dense attention."""
from __future__ import annotations

import torch
import torch.nn as nn

from .common import RMSNorm, TransformerBlock, sdpa_causal, swiglu_hidden
from .dilated_attention import dilated_offsets


def make_dilated_attn(local_width: int):
    # Not traced by torch.compile (the kernel call is a graph break anyway): the offsets are a Python list
    # that depends on the patch count, and tracing it would guard on which power of two the count passes,
    # recompiling the latent stack whenever a batch's patch count crosses one.
    @torch.compiler.disable
    def attn(q, k, v):
        from ..kernels import dilated_attention  # Triton on CUDA, gather reference elsewhere

        return dilated_attention(q, k, v, dilated_offsets(q.shape[2], local_width))

    return attn


class LatentTransformer(nn.Module):
    def __init__(self, dim: int, n_layers: int, n_heads: int, ffn_mult: float = 8 / 3, attention: str = "dilated",
                 local_width: int = 3):
        super().__init__()
        if attention not in ("dilated", "dense"):
            raise ValueError(f"unknown attention {attention!r}")
        self.attention, self.local_width = attention, local_width
        attn_fn = make_dilated_attn(local_width) if attention == "dilated" else sdpa_causal
        hidden = swiglu_hidden(dim, ffn_mult)
        self.blocks = nn.ModuleList([TransformerBlock(dim, n_heads, hidden, attn_fn) for _ in range(n_layers)])
        self.norm = RMSNorm(dim)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(z.shape[1], device=z.device)
        for blk in self.blocks:
            z = blk(z, pos)
        return self.norm(z)
