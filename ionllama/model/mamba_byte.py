"""MambaByte-style baseline: a byte LM made of selective-SSM blocks only (no attention, no patching).

    bytes -> embedding -> n_layers x MambaBlock (Mamba-2 mixer, ionllama/model/ssm.py) -> norm -> 256-way head

A Mamba block has ~6 d^2 parameters against ~12 d^2 for a transformer block, so at equal width it
takes about twice the layers for equal parameters (as in the MambaByte paper); the experiment's arm
table sets the depth. Generation keeps each block's conv buffer and SSM state, so a byte costs one step.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..config import ModelConfig
from ..registry import register
from .common import RMSNorm, checked_input
from .dense import GenerateMixin, ParamCountMixin, lm_outputs
from .ssm import MambaBlock

D_STATE = 64  # SSM state size per head (Mamba-2 uses 64..128)
HEADDIM = 64  # channels per SSM head
EXPAND = 2  # inner width = EXPAND * d_model


@register("mamba", reads=("d_model", "n_layers", "vocab_size", "conv_kernel", "scan_chunk"))
class MambaByte(ParamCountMixin, GenerateMixin, nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        d = config.d_model
        headdim = HEADDIM if (EXPAND * d) % HEADDIM == 0 else math.gcd(EXPAND * d, HEADDIM)
        self.embed = nn.Embedding(config.vocab_size, d)
        self.blocks = nn.ModuleList([MambaBlock(d, d_state=D_STATE, headdim=headdim, expand=EXPAND,
                                                conv_kernel=config.conv_kernel, chunk=config.scan_chunk)
                                     for _ in range(config.n_layers)])
        self.norm = RMSNorm(d)
        self.head = nn.Linear(d, config.vocab_size, bias=False)
        # GPT-2 style init on the matrices (the conv and SSM parameters keep their Mamba init)
        for name, p in self.named_parameters():
            if name.endswith("out_proj.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * max(config.n_layers, 1)))
            elif name.endswith(("in_proj.weight", "embed.weight", "head.weight")):
                nn.init.normal_(p, 0.0, 0.02)

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> dict:
        x, targets = checked_input(x, targets)
        B, T = x.shape
        h = self.embed(x.long())
        for blk in self.blocks:
            h = blk(h)
        logits = self.head(self.norm(h))
        return lm_outputs(logits, targets, torch.full((B,), T, device=x.device, dtype=torch.long))


def _register_decoder() -> None:
    from ..generation.decoding import IncrementalDecoder, register_decoder

    @register_decoder("mamba")
    class MambaDecoder(IncrementalDecoder):
        """Per-block conv buffer + SSM state; prefill runs each prompt through the parallel forward."""

        def prefill(self, rows):
            self._check_rows(rows)
            m = self.model
            caches, logits = [], []
            for r in rows:  # rows differ in length: each gets its own exact final state
                h = m.embed(torch.tensor([r], dtype=torch.long, device=self.device))
                states = []
                for blk in m.blocks:
                    h, st = blk(h, return_state=True)
                    states.append(st)
                caches.append(states)
                logits.append(m.head(m.norm(h[:, -1])))
            new = [{k: torch.cat([c[i][k] for c in caches]) for k in caches[0][i]} for i in range(len(m.blocks))]
            if getattr(self, "cache", None) is None:
                self.cache = new
            else:  # prefilled again: into the tensors a captured graph holds (DecodeRunner.reset)
                for old, fresh in zip(self.cache, new):
                    for k, v in fresh.items():
                        old[k].copy_(v)
            return torch.cat(logits)

        def step(self, tokens):
            m = self.model
            h = m.embed(tokens.long())
            for i, blk in enumerate(m.blocks):
                h, new = blk.step(h, self.cache[i])
                for k, v in new.items():  # in place: a captured CUDA graph keeps the tensors it recorded
                    self.cache[i][k].copy_(v)
            return m.head(m.norm(h))


_register_decoder()
