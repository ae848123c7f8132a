"""Transformer local layers (the ablation for IntegralLNN): causal sliding-window attention over
bytes. Query t sees keys t-W+1..t. Computed block-wise (each block of W queries against its own and
the previous block's keys): O(T * W) time and memory, no T x T mask."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import TransformerBlock


def local_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> torch.Tensor:
    """q, k, v: (B, H, T, Dh) -> (B, H, T, Dh); query i attends to keys j with i - window < j <= i."""
    B, H, T, Dh = q.shape
    W = max(1, min(window, T))  # a window past the sequence sees every earlier key anyway: its (W, 2W) blocks cost
    # O(window^2) memory for any T (local_window 16384 at T 64: gigabytes), the same outputs as W = T
    n = -(-T // W)
    pad = n * W - T
    q = F.pad(q, (0, 0, 0, pad)).view(B, H, n, W, Dh)
    kp = F.pad(k, (0, 0, W, pad))  # one empty block in front
    vp = F.pad(v, (0, 0, W, pad))
    kb = kp.unfold(2, 2 * W, W).transpose(-1, -2)  # (B, H, n, 2W, Dh)
    vb = vp.unfold(2, 2 * W, W).transpose(-1, -2)
    r = torch.arange(W, device=q.device)[:, None]
    m = torch.arange(2 * W, device=q.device)[None, :]
    lag = r + W - m  # query index - key index
    allowed = (lag >= 0) & (lag < W)
    first = allowed & (m >= W)  # block 0: the padded block in front holds no keys
    mask = torch.stack([first] + [allowed] * (n - 1)) if n > 1 else first[None]
    out = F.scaled_dot_product_attention(q, kb, vb, attn_mask=mask)  # (B, H, n, W, Dh)
    return out.reshape(B, H, n * W, Dh)[:, :, :T]


class LocalAttentionBlock(TransformerBlock):
    """Pre-norm transformer block with sliding-window causal attention (same params as IntegralLNN)."""

    def __init__(self, dim: int, n_heads: int, ffn_hidden: int, window: int, dropout: float = 0.0):
        super().__init__(dim, n_heads, ffn_hidden, attn_fn=lambda q, k, v: local_window_attention(q, k, v, window),
                         dropout=dropout)
        self.window = window
