"""Pool byte vectors into patch vectors with scatter ops (no loop over bytes or patches)."""
from __future__ import annotations

import torch
import torch.nn as nn

from .common import upcast, upcast_dtype


class PatchPooling(nn.Module):
    """mean: average of the patch's byte vectors; attention: softmax-weighted by a learned score."""

    def __init__(self, dim: int, mode: str = "mean"):
        super().__init__()
        if mode not in ("mean", "attention"):
            raise ValueError(f"unknown pooling {mode!r}")
        self.mode = mode
        if mode == "attention":
            self.score = nn.Linear(dim, 1)

    def byte_weights(self, h: torch.Tensor) -> torch.Tensor:
        """Unnormalised per-byte scores (fp32, float64 for a float64 model); the running-max shift is done by callers."""
        if self.mode == "attention":
            return upcast(self.score(h).squeeze(-1))
        return torch.zeros(h.shape[:2], device=h.device, dtype=upcast_dtype(h.dtype))

    def forward(self, h: torch.Tensor, b2p: torch.Tensor, n_out: int) -> torch.Tensor:
        """h: (B, T, D), b2p: (B, T) patch index of each byte -> (B, n_out, D)."""
        B, T, D = h.shape
        s = self.byte_weights(h)  # (B, T)
        smax = torch.full((B, n_out), float("-inf"), device=h.device, dtype=s.dtype).scatter_reduce(1, b2p, s.detach(),
                                                                                                     "amax")
        w = torch.exp(s - smax.gather(1, b2p))  # (B, T), stable within each patch
        num = torch.zeros(B, n_out, D, device=h.device, dtype=s.dtype).scatter_add(1, b2p[..., None].expand(B, T, D),
                                                                                    w[..., None] * upcast(h))
        den = torch.zeros(B, n_out, device=h.device, dtype=s.dtype).scatter_add(1, b2p, w)
        return (num / den.clamp_min(1e-30)[..., None]).to(h.dtype)
