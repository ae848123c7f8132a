"""Causal depthwise 1-D convolution: output t sees inputs t-k+1..t only (left padding).

The forward is a sum of k shifted products in the (B, T, C) layout, not F.conv1d: torch.compile fuses
it (with its neighbours) into one elementwise kernel, where cuDNN/ATen's depthwise conv is a separate,
slow generic kernel plus two transposes (about 15 % of ionllama-small's GPU kernel time in a training
step, docs/results/train-profile.md). `causal_depthwise_conv_reference` is the plain F.conv1d oracle, and
tests compare the two (values and gradients)."""
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
        return causal_depthwise_conv(x, self.weight[:, 0], self.bias)

    def step(self, x_t: torch.Tensor, buf: torch.Tensor):
        """One step. x_t: (B, C); buf: (B, kernel-1, C) previous inputs. Returns (y_t, new_buf)."""
        # no (B, k, C) window: compiled, a cat of a matmul output is a kernel of its own
        w = self.weight[:, 0].t().to(x_t.dtype)  # (k, C)
        y = (buf * w[:-1]).sum(1) + x_t * w[-1] + self.bias.to(x_t.dtype)
        if buf.shape[1] == 0:  # kernel 1 keeps no inputs: the cat grew the buffer to 1 (the cache's layout changed)
            return y, buf
        return y, torch.cat([buf[:, 1:], x_t[:, None]], dim=1)

    def tail(self, x: torch.Tensor) -> torch.Tensor:
        """Conv buffer after consuming x (B, T, C): its last kernel-1 inputs (zero-padded on the left)."""
        k = self.kernel - 1
        return F.pad(x.transpose(1, 2), (k, 0))[..., -k:].transpose(1, 2) if k else x[:, :0]


def causal_depthwise_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x (B, T, C), weight (C, k), bias (C,) -> (B, T, C): sum of k shifted products, in x's dtype."""
    k, T = weight.shape[1], x.shape[1]
    w = weight.t().to(x.dtype)  # (k, C): w[j] multiplies input t-(k-1)+j
    xp = F.pad(x, (0, 0, k - 1, 0))  # (B, T+k-1, C), zeros before the sequence
    y = xp[:, k - 1:] * w[k - 1] + bias.to(x.dtype)
    for j in range(k - 1):  # k is a small constant (4): unrolled at trace time
        y = y + xp[:, j:j + T] * w[j]
    return y


def causal_conv_gate_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """IntegralLNN's scan input: x (B, T, 2D) = (gate, candidate) channels, weight (2D, k), bias (2D,) ->
    sigmoid(conv(x)[..., :D]) * conv(x)[..., D:]  (B, T, D). The oracle for ionllama/kernels/conv_gate_triton.py
    and the path off CUDA."""
    g, c = causal_depthwise_conv(x, weight, bias).chunk(2, dim=-1)
    return torch.sigmoid(g) * c


def causal_depthwise_conv_reference(conv: CausalDepthwiseConv, x: torch.Tensor) -> torch.Tensor:
    """The same layer through F.conv1d (the oracle for CausalDepthwiseConv.forward)."""
    xt = F.pad(x.transpose(1, 2), (conv.kernel - 1, 0))
    return F.conv1d(xt, conv.weight.to(x.dtype), conv.bias.to(x.dtype), groups=x.shape[-1]).transpose(1, 2)
