"""In-place writes of one vector per row into a preallocated cache, at a per-row slot.

Why not ``cache[layer].scatter_(...)``: torch.compile (inductor) turns a scatter_ on a cache, or on a
view of one, into an out-of-place scatter plus a copy back, so every compiled step copied the whole
cache (for ionLlama's latent cache at 32K bytes of context: ~0.4 GB per layer stack, several times per
latent step; visible as full-size temporaries in the generated code). ``index_put_`` on the base
tensor is kept in place (tests/test_decode_fast.py checks the generated code). Eager results are
identical: both only write the given slots.
"""
from __future__ import annotations

import torch


class SlotWriter:
    def __init__(self, batch: int, heads: int, device, layers: int = 1):
        self.rows = torch.arange(batch, device=device)[:, None]  # (B, 1)
        self.heads = torch.arange(heads, device=device)[None, :]  # (1, H)
        self.layers = torch.arange(layers, device=device)[:, None, None]  # (L, 1, 1)

    def write(self, cache: torch.Tensor, slot: torch.Tensor, val: torch.Tensor, layer: int | None = None) -> None:
        """cache (L, B, H, N, Dh) with `layer`, else (B, H, N, Dh); slot (B,) long; val (B, H, Dh)."""
        idx = (self.rows, self.heads, slot[:, None])
        if layer is not None:
            idx = (self.layers[layer],) + idx
        cache.index_put_(idx, val.to(cache.dtype))

    def write_rows(self, table: torch.Tensor, col: torch.Tensor, val: torch.Tensor) -> None:
        """table (B, N): table[r, col[r]] = val[r]; col (B,) or a 0-d tensor shared by every row."""
        table.index_put_((self.rows[:, 0], col.expand(self.rows.shape[0])), val.to(table.dtype))
