"""Cached state of one byte-level local layer (encoder / decoder of ionLlama), per sequence.

* IntegralLNN block: causal conv buffer + recurrent state h (the block's own ``step`` API).
* Transformer block with causal local-window attention: a ring buffer of the last W keys/values
  (slot = position mod W), so a step costs O(W) whatever the context length.
State tensors are allocated once and updated in place (CUDA-graph friendly)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..model.common import apply_rope, rope_cos_sin
from .slots import SlotWriter


class IntegralState:
    def __init__(self, layer, batch, device, dtype):
        self.layer = layer
        self.cache = layer.empty_cache(batch, device, dtype)
        with torch.no_grad():  # the per-channel decay is a constant while decoding: computed once
            self.decay = torch.exp(layer.log_decay()).to(self.cache["h"].dtype)

    def prefill(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        y, st = self.layer(x, return_state=True)
        for k, v in st.items():
            self.cache[k][rows] = v.to(self.cache[k].dtype)
        return y

    def step(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        y, new = self.layer.step(x_t, self.cache, decay=self.decay)
        for k, v in new.items():
            self.cache[k].copy_(v)
        return y


class WindowAttentionState:
    """For ``LocalAttentionBlock`` (RoPE at absolute byte positions, keys t-W+1..t)."""

    def __init__(self, layer, batch, device, dtype):
        self.layer = layer
        attn = layer.attn
        self.W, self.H, self.Dh = layer.window, attn.n_heads, attn.head_dim
        self.k = torch.zeros(batch, self.H, self.W, self.Dh, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.slot_pos = torch.full((batch, self.W), -1, dtype=torch.long, device=device)
        self.slots = SlotWriter(batch, self.H, device)

    def prefill(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        layer, (G, T, _) = self.layer, x.shape
        y = layer(x)
        n = min(T, self.W)
        pos = torch.arange(T - n, T, device=x.device)
        _, k, v = layer.attn.project_qkv(layer.norm1(x[:, T - n:]), pos)
        slots = pos % self.W
        k_all, v_all = self.k[rows], self.v[rows]
        k_all[:, :, slots], v_all[:, :, slots] = k, v
        sp = torch.full((G, self.W), -1, dtype=torch.long, device=x.device)
        sp[:, slots] = pos
        self.k[rows], self.v[rows], self.slot_pos[rows] = k_all, v_all, sp
        return y

    def step(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        layer, attn = self.layer, self.layer.attn
        B, H, Dh = x_t.shape[0], self.H, self.Dh
        qkv = attn.qkv(layer.norm1(x_t)).view(B, 1, 3, H, Dh).permute(2, 0, 3, 1, 4)
        cos, sin = rope_cos_sin(t[:, None], Dh, attn.rope_base)
        q, k = apply_rope(qkv[:2], cos, sin)  # q and k in one call: half the rope ops
        v = qkv[2]
        slot = t % self.W
        self.slots.write(self.k, slot, k[:, :, 0])
        self.slots.write(self.v, slot, v[:, :, 0])
        self.slots.write_rows(self.slot_pos, slot, t)
        visible = (self.slot_pos >= 0).view(B, 1, 1, self.W)  # every written slot is within the window
        y = F.scaled_dot_product_attention(q, self.k, self.v, attn_mask=visible)
        x = x_t + attn.proj(y.reshape(B, H * Dh))
        return x + layer.ffn(layer.norm2(x))


def local_state(layer, batch, device, dtype):
    if hasattr(layer, "window"):
        return WindowAttentionState(layer, batch, device, dtype)
    return IntegralState(layer, batch, device, dtype)
