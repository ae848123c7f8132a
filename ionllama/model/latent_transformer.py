"""Latent transformer over patches: pre-norm, RoPE, SwiGLU; dilated (O(n log n)) or dense attention."""
from __future__ import annotations

import torch
import torch.nn as nn

from .common import RMSNorm, TransformerBlock, sdpa_causal, swiglu_hidden


def make_dilated_attn(local_width: int):
    # The offsets ({0..w-1} U {2^k} < N) are computed where the kernel runs, never traced by torch.compile:
    # a traced Python list that depends on the patch count would guard on which power of two the count
    # passes and recompile the latent stack whenever a batch's count crosses one.
    def attn(q, k, v):
        from ..kernels import dilated_attention_local  # Triton custom op on CUDA, gather reference elsewhere

        return dilated_attention_local(q, k, v, local_width)

    return attn


class LatentTransformer(nn.Module):
    def __init__(self, dim: int, n_layers: int, n_heads: int, ffn_mult: float = 8 / 3, attention: str = "dilated",
                 local_width: int = 3, dropout: float = 0.0):
        super().__init__()
        if attention not in ("dilated", "dense"):
            raise ValueError(f"unknown attention {attention!r}")
        self.attention, self.local_width = attention, local_width
        attn_fn = make_dilated_attn(local_width) if attention == "dilated" else sdpa_causal
        hidden = swiglu_hidden(dim, ffn_mult)
        self.blocks = nn.ModuleList([TransformerBlock(dim, n_heads, hidden, attn_fn, dropout) for _ in range(n_layers)])
        self.norm = RMSNorm(dim)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        from ..kernels import rope_cos_sin_table  # on CUDA an opaque op: compiled, the table is stored once

        pos = torch.arange(z.shape[1], device=z.device)
        attn = self.blocks[0].attn if len(self.blocks) else None
        rope = rope_cos_sin_table(pos, attn.head_dim, attn.rope_base) if attn is not None else None
        for blk in self.blocks:  # every layer reads the same table
            z = blk(z, pos, rope)
        return self.norm(z)
