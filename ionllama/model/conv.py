"""Causal depthwise 1-D convolution: output t sees inputs t-k+1..t only (left padding)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class CausalDepthwiseConv(nn.Module):
    def __init__(self, channels: int, kernel: int):
        super().__init__()
        self.kernel = kernel
        self.weight = nn.Parameter(torch.randn(channels, 1, kernel) / kernel ** 0.5)
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, T, C) -> (B, T, C)."""
        xt = F.pad(x.transpose(1, 2), (self.kernel - 1, 0))
        return F.conv1d(xt, self.weight.to(x.dtype), self.bias.to(x.dtype), groups=x.shape[-1]).transpose(1, 2)

    def step(self, x_t: torch.Tensor, buf: torch.Tensor):
        """One step. x_t: (B, C); buf: (B, kernel-1, C) previous inputs. Returns (y_t, new_buf)."""
        window = torch.cat([buf, x_t[:, None]], dim=1)  # (B, k, C)
        y = (window * self.weight[:, 0].t().to(x_t.dtype)).sum(1) + self.bias.to(x_t.dtype)
        return y, window[:, 1:]

    def tail(self, x: torch.Tensor) -> torch.Tensor:
        """Conv buffer after consuming x (B, T, C): its last kernel-1 inputs (zero-padded on the left)."""
        k = self.kernel - 1
        return F.pad(x.transpose(1, 2), (k, 0))[..., -k:].transpose(1, 2) if k else x[:, :0]
