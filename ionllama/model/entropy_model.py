"""The entropy model: a small causal byte LM built from selective-SSM blocks.

Its next-byte entropy H(x_{t+1} | x_<=t) (bits) at every position drives dynamic patching. It is
trained first (phase 1), then frozen while the main model trains."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .common import RMSNorm, scored_cross_entropy, upcast
from .ssm import MambaBlock

LN2 = math.log(2.0)


def entropy_bits(logits: torch.Tensor) -> torch.Tensor:
    logp = F.log_softmax(upcast(logits), dim=-1)
    return -(logp.exp() * logp).sum(-1) / LN2


class EntropyModel(nn.Module):
    def __init__(self, dim: int = 64, n_layers: int = 2, d_state: int = 16, headdim: int = 16, conv_kernel: int = 4,
                 chunk: int = 64):
        super().__init__()
        self.embed = nn.Embedding(256, dim)
        self.blocks = nn.ModuleList([MambaBlock(dim, d_state=d_state, headdim=headdim, conv_kernel=conv_kernel,
                                                chunk=chunk) for _ in range(n_layers)])
        self.norm = RMSNorm(dim)
        self.head = nn.Linear(dim, 256, bias=False)
        nn.init.normal_(self.embed.weight, 0, 0.02)
        nn.init.normal_(self.head.weight, 0, 0.02)

    def compile_blocks(self, **kw) -> None:
        for blk in self.blocks:
            blk.compile(**kw)

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> dict:
        h = self.embed(x.long())
        for blk in self.blocks:
            h = blk(h)
        logits = self.head(self.norm(h))
        out = {"logits": logits, "entropy": entropy_bits(logits).detach(), "loss": None, "bpb": None}
        if targets is not None:
            loss = scored_cross_entropy(logits, targets)
            out["loss"], out["bpb"] = loss, loss.detach() / LN2
        return out
