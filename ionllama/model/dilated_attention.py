"""Dilated causal attention over patches: query i attends to keys i - o for o in a fixed offset set.

The offsets are {0, 1, ..., local_width-1} U {2^k >= local_width}, so each query sees O(log n)
keys and the whole layer costs O(n log n) time and memory. The reference below gathers the
K shifted key/value rows per query (an (n, K) index table, never an n x n mask). It is the oracle
for the Triton kernel in ``ionllama/kernels/dilated_attention_triton.py``.
"""
from __future__ import annotations

import math

import torch


def dilated_offsets(n: int, local_width: int = 3) -> list[int]:
    """Offsets {0..local_width-1} U {powers of two >= local_width}, all < n (n = sequence length)."""
    offs = list(range(min(local_width, max(n, 1))))
    p = 1
    while p < n:
        if p >= local_width:
            offs.append(p)
        p *= 2
    return offs


def dilated_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                offsets: list[int], segment_ids: torch.Tensor | None = None,
                                scale: float | None = None, return_lse: bool = False):
    """q, k, v: (B, H, N, Dh). segment_ids: (B, N) ints or None (packed sequences: a query only
    sees keys of its own segment). Returns out (B, H, N, Dh) [and lse (B, H, N) in fp32]."""
    B, H, N, Dh = q.shape
    scale = scale if scale is not None else 1.0 / math.sqrt(Dh)
    offs = torch.tensor([o for o in offsets if o < N], device=q.device, dtype=torch.long)
    idx = torch.arange(N, device=q.device)[:, None] - offs[None, :]  # (N, K)
    valid = idx >= 0
    idx_c = idx.clamp_min(0)
    k_g = k[:, :, idx_c]  # (B, H, N, K, Dh)
    v_g = v[:, :, idx_c]
    work = torch.promote_types(q.dtype, torch.float32)
    s = torch.einsum("bhnd,bhnkd->bhnk", q.to(work), k_g.to(work)) * scale
    mask = valid[None]  # (1, N, K)
    if segment_ids is not None:
        mask = mask & (segment_ids[:, idx_c] == segment_ids[:, :, None])  # (B, N, K)
    s = s.masked_fill(~mask[:, None], float("-inf"))  # offset 0 is always valid: no empty rows
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None])
    out = torch.einsum("bhnk,bhnkd->bhnd", p, v_g.to(work)).to(q.dtype)
    return (out, lse) if return_lse else out
