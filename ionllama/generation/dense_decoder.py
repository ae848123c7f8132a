"""KV-cache decoder for the dense byte transformer (ionllama/model/dense.py).

Reuses the model's own modules (embed, blocks' norm/qkv/proj/ffn, norm, head). The cache is
preallocated, (layers, B, H, max_len, Dh), and every step has the same shapes, so the step
can be captured as a CUDA graph (``grow`` makes a longer cache; the graph is captured again).
Rows are right-padded at prefill: RoPE position i is the i-th byte of each row and each row
writes its next byte at its own position ``pos[r]``; keys past a row's position are masked (they
hold padding or stale values).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..model.common import apply_rope, rope_cos_sin
from .decoding import IncrementalDecoder, grown, register_decoder, right_pad
from .slots import SlotWriter


@register_decoder("dense")
class DenseKVDecoder(IncrementalDecoder):
    def __init__(self, model, batch_size, max_len):
        super().__init__(model, batch_size, max_len)
        attn = model.blocks[0].attn
        self.n_heads, self.head_dim, self.rope_base = attn.n_heads, attn.head_dim, attn.rope_base
        L = len(model.blocks)
        shape = (L, batch_size, self.n_heads, max_len, self.head_dim)
        self.k = torch.zeros(shape, device=self.device, dtype=self.dtype)
        self.v = torch.zeros(shape, device=self.device, dtype=self.dtype)
        self.pos = torch.zeros(batch_size, dtype=torch.long, device=self.device)  # next write position
        self.key_index = torch.arange(max_len, device=self.device)
        self.slots = SlotWriter(batch_size, self.n_heads, self.device, L)

    def _grow(self, max_len):
        self.k, self.v = grown(self.k, 3, max_len), grown(self.v, 3, max_len)
        self.key_index = torch.arange(max_len, device=self.device)
        return True

    def prefill(self, rows):
        self._check_rows(rows)
        m = self.model
        x, lengths = right_pad(rows, self.device)
        B, T = x.shape
        pos = torch.arange(T, device=self.device)
        h = m.embed(x)
        for li, blk in enumerate(m.blocks):
            q, k, v = blk.attn.project_qkv(blk.norm1(h), pos)
            self.k[li, :, :, :T] = k
            self.v[li, :, :, :T] = v
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            h = h + blk.attn.proj(y.transpose(1, 2).reshape(B, T, -1))
            h = h + blk.ffn(blk.norm2(h))
        last = h.gather(1, (lengths - 1).view(B, 1, 1).expand(B, 1, h.shape[-1]))[:, 0]
        self.pos.copy_(lengths)
        return m.head(m.norm(last))

    def step(self, tokens):
        m = self.model
        B, H, Dh = self.batch_size, self.n_heads, self.head_dim
        pos = self.pos
        h = m.embed(tokens.long())[:, None]  # (B, 1, D)
        cos, sin = rope_cos_sin(pos[:, None], Dh, self.rope_base)  # (B, 1, Dh/2)
        visible = (self.key_index[None, :] <= pos[:, None]).view(B, 1, 1, -1)
        for li, blk in enumerate(m.blocks):
            qkv = blk.attn.qkv(blk.norm1(h)).view(B, 1, 3, H, Dh).permute(2, 0, 3, 1, 4)
            q, k = apply_rope(qkv[:2], cos, sin)  # q and k in one call: half the rope ops
            v = qkv[2]
            self.slots.write(self.k, pos, k[:, :, 0], layer=li)  # in place when compiled (see slots.py)
            self.slots.write(self.v, pos, v[:, :, 0], layer=li)
            y = F.scaled_dot_product_attention(q, self.k[li], self.v[li], attn_mask=visible)
            h = h + blk.attn.proj(y.transpose(1, 2).reshape(B, 1, -1))
            h = h + blk.ffn(blk.norm2(h))
        pos += 1
        return m.head(m.norm(h[:, 0]))
