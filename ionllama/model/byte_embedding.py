"""Byte embedding with causal n-gram context.

`hash` (BLT-style): besides the 256 byte vectors, each position adds one learned vector per n-gram
size n, looked up by a hash of bytes t-n+1..t (positions before the start hash a pad symbol).
`hash_nodigit`: as `hash`, but an n-gram holding an ASCII digit adds nothing (the tables cost the 35M rows their
multi-digit sums, docs/results/phase1-tasks-best-dense.md: this keeps them for text and takes them off numbers).
`conv`: a causal depthwise convolution over the byte vectors. `none`: plain byte vectors.
Every variant sees only bytes <= t, so position t may predict byte t+1.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .conv import CausalDepthwiseConv

_PAD = 256  # a symbol outside 0..255 for positions before the sequence start
_MULT = 1_000_003
_MASK = (1 << 40) - 1


def ngram_hashes(x: torch.Tensor, n: int, buckets: int) -> torch.Tensor:
    """x: (B, T) bytes -> (B, T) bucket ids of the n-gram ending at each position."""
    xp = F.pad(x.long(), (n - 1, 0), value=_PAD)
    h = torch.zeros_like(x, dtype=torch.long)
    T = x.shape[1]
    for j in range(n):  # loop over the n-gram width (<= 8), not over time
        h = (h * _MULT + xp[:, j:j + T] + 1) & _MASK
    return (h * 2654435761 + n) % buckets


HASHED = ("hash", "hash_nodigit")  # the n-gram modes with hash tables


def _is_digit(x: torch.Tensor) -> torch.Tensor:
    return (x >= 48) & (x <= 57)  # b"0".."9"; the pad symbol (256) is none


def ngram_digit_masks(x: torch.Tensor, sizes) -> list[torch.Tensor]:
    """x: (B, T) bytes -> for each size n, a (B, T) bool: the n-gram ending at each position holds a digit. One
    pass over the widths for all sizes (each size's own pass repeated the smaller ones' shifts)."""
    d = _is_digit(x)
    cur, masks = d.clone(), {}
    for j in range(max(sizes)):  # loop over the n-gram width, not over time
        if 0 < j < x.shape[1]:
            cur[:, j:] |= d[:, :-j]
        if j + 1 in sizes:
            masks[j + 1] = cur.clone()
    return [masks[n] for n in sizes]


class LastNgramHasher:
    """For incremental decoding: the bucket ids of the n-grams ending at the newest byte.

    ngram_hashes folds h = (h * _MULT + b + 1) mod 2^40, i.e. h_n = sum_j (b_j + 1) _MULT^(n-1-j) mod 2^40
    over the last n bytes, so every size is one multiply-sum with a (width, sizes) table of powers (zero
    outside the n-gram): one fused kernel per decoded byte, no cumsum (an extra library kernel) or cat.
    Integer-exact: the sum is < 5 * 257 * 2^40. The constants are device tensors made once (no
    host-to-device copy inside a captured step)."""

    def __init__(self, sizes, buckets: int, width: int, device):
        assert width >= max(sizes)
        self.buckets = buckets
        coef = [[pow(_MULT, width - 1 - j, 1 << 40) if j >= width - n else 0 for n in sizes]
                for j in range(width)]  # < 2^40; x 257, summed over <= 8 bytes: no overflow
        self.coef = torch.tensor(coef, dtype=torch.long, device=device)  # (width, len(sizes))
        self.n = torch.tensor(list(sizes), dtype=torch.long, device=device)

    def __call__(self, window: torch.Tensor) -> torch.Tensor:
        """window: (B, width) the last bytes (_PAD before the start) -> (B, len(sizes)); column i equals
        ngram_hashes(x, sizes[i], buckets)[:, -1]."""
        h = ((window.long()[:, :, None] + 1) * self.coef).sum(1)
        return ((h & _MASK) * 2654435761 + self.n) % self.buckets

    def ring(self, ring: torch.Tensor, last: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """As __call__ on the window (the ring's bytes in time order, then `last`). The width-1 bytes before
        `last` (position t (B,)) sit in a ring buffer, byte p in slot p % (width-1): rotate the small
        powers table, not the bytes."""
        k = ring.shape[1]
        j = (torch.arange(k, device=ring.device)[None, :] - t[:, None]) % k  # (B, k) window column of each slot
        h = ((ring.long()[:, :, None] + 1) * self.coef[j]).sum(1) + (last.long()[:, None] + 1) * self.coef[-1]
        return ((h & _MASK) * 2654435761 + self.n) % self.buckets

    def ring_has_digit(self, ring: torch.Tensor, last: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """As ngram_digit_masks' last column, from ring's window: (B, len(sizes)) bool."""
        k = ring.shape[1]
        j = (torch.arange(k, device=ring.device)[None, :] - t[:, None]) % k
        inside = self.coef[j] != 0  # (B, k, sizes): the slot's byte is in that size's n-gram
        return (_is_digit(ring)[:, :, None] & inside).any(1) | _is_digit(last)[:, None]


class ByteEmbedding(nn.Module):
    def __init__(self, dim: int, ngram: str = "hash", ngram_sizes=(2, 3, 4, 5), buckets: int = 16384,
                 conv_kernel: int = 4):
        super().__init__()
        self.ngram, self.ngram_sizes, self.buckets = ngram, tuple(ngram_sizes), buckets
        self.bytes = nn.Embedding(256, dim)
        if ngram in HASHED:
            self.tables = nn.ModuleList([nn.Embedding(buckets, dim) for _ in self.ngram_sizes])
        elif ngram == "conv":
            self.conv = CausalDepthwiseConv(dim, conv_kernel)
        elif ngram != "none":
            raise ValueError(f"unknown ngram mode {ngram!r}")

    @property
    def context(self) -> int:
        """How many previous bytes an embedding depends on (for incremental decoding)."""
        if self.ngram in HASHED:
            return max(self.ngram_sizes) - 1
        if self.ngram == "conv":  # the causal conv reads bytes t-k+1..t
            return self.conv.kernel - 1
        return 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.bytes(x.long())
        if self.ngram in HASHED:
            scale = 1.0 / (1 + len(self.ngram_sizes))  # the same with digits skipped: text positions unchanged
            skip = ngram_digit_masks(x, self.ngram_sizes) if self.ngram == "hash_nodigit" else None
            for i, (n, table) in enumerate(zip(self.ngram_sizes, self.tables)):
                v = table(ngram_hashes(x, n, self.buckets))
                e = e + (v if skip is None else v.masked_fill(skip[i][..., None], 0.0))
            e = e * scale
        elif self.ngram == "conv":
            e = e + self.conv(e)
        return e
