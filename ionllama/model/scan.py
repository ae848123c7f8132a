"""Linear recurrences h_t = a_t * h_{t-1} + u_t computed in parallel, O(T) work.

Two plain-PyTorch references (the oracles for the Triton kernels in ionllama/kernels/):

* ``scan_const_decay`` - per-channel constant decay (IntegralLNN). Inside a chunk of C steps the
  recurrence is a (C x C) lower-triangular Toeplitz matrix per channel, applied with one einsum;
  the chunk-end states form the same recurrence with decay a**C over T/C steps, solved recursively.
  Work O(T * C * D), memory O(T * D): no T x T matrix, no Python loop over time.
* ``scan_general`` - decay varying with (batch, time, channel) (the selective SSM's inter-chunk states use
  its matmul form, ``ionllama.model.ssm._pass_states``).
  Inside a chunk the weights exp(cum_i - cum_j) (i >= j, exponent <= 0, so never overflows) are
  formed explicitly; chunk carries are solved recursively as above.

``scan_loop`` is the naive Python-loop recurrence, used only by tests as ground truth.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _pad_time(x: torch.Tensor, T_pad: int, value: float = 0.0) -> torch.Tensor:
    T = x.shape[1]
    if T_pad == T:
        return x
    pad = [0, 0] * (x.dim() - 2) + [0, T_pad - T]
    return F.pad(x, pad, value=value)


def scan_const_decay(u: torch.Tensor, log_a: torch.Tensor, h0: torch.Tensor | None = None,
                     chunk: int = 64) -> torch.Tensor:
    """h_t = exp(log_a) * h_{t-1} + u_t.  u: (B, T, D), log_a: (D,) <= 0, h0: (B, D) or None.

    Returns h: (B, T, D) in u's dtype (accumulates in fp32).
    """
    B, T, D = u.shape
    if chunk < 2 and T > 1:  # each level of the recursion shortens T by the chunk: 1 never ends
        raise ValueError(f"scan chunk must be at least 2, got {chunk}")
    out_dtype = u.dtype
    work = torch.promote_types(u.dtype, torch.float32)
    u, log_a = u.to(work), log_a.to(work)
    C = min(chunk, T)
    n = -(-T // C)
    up = _pad_time(u, n * C).view(B, n, C, D)
    i = torch.arange(C, device=u.device)
    lag = (i[:, None] - i[None, :]).to(u.dtype)  # (C, C) i - j
    causal = lag >= 0
    # W[i, j, d] = a_d^(i-j) for i >= j; a^0 = 1 exactly, also for a = 0 (log_a = -inf: 0 * -inf was NaN)
    W = torch.exp(torch.where(lag[..., None] > 0, lag.clamp_min(1)[..., None] * log_a, 0.0)) * causal[..., None]
    h_local = torch.einsum("ijd,bnjd->bnid", W, up)  # (B, n, C, D)
    decay_from_start = torch.exp((i + 1).to(u.dtype)[:, None] * log_a)  # (C, D): a^(i+1)
    if n == 1:
        carry = h0.to(work)[:, None] if h0 is not None else None
    else:
        ends = h_local[:, :, -1]  # (B, n, D)
        H = scan_const_decay(ends, log_a * C, h0, chunk)  # state after each chunk
        first = h0.to(work)[:, None] if h0 is not None else torch.zeros_like(H[:, :1])
        carry = torch.cat([first, H[:, :-1]], dim=1)  # (B, n, D): state entering each chunk
    h = h_local if carry is None else h_local + decay_from_start * carry[:, :, None, :]
    return h.reshape(B, n * C, D)[:, :T].to(out_dtype)


def scan_general(log_a: torch.Tensor, u: torch.Tensor, h0: torch.Tensor | None = None,
                 chunk: int = 16) -> torch.Tensor:
    """h_t = exp(log_a_t) * h_{t-1} + u_t with time-varying decay.

    log_a: (B, T, *Sa) broadcastable against u: (B, T, *S) (same number of dims), log_a <= 0.
    h0: (B, *S) or None.  Memory O(T * C * prod(S)).
    """
    B, T = u.shape[:2]
    if chunk < 2 and T > 1:  # as scan_const_decay: a chunk of 1 never shortens the recursion
        raise ValueError(f"scan chunk must be at least 2, got {chunk}")
    out_dtype = u.dtype
    work = torch.promote_types(u.dtype, torch.float32)
    u, log_a = u.to(work), log_a.to(work)
    C = min(chunk, T)
    n = -(-T // C)
    la = _pad_time(log_a, n * C).reshape(B, n, C, *log_a.shape[2:])
    uu = _pad_time(u, n * C).reshape(B, n, C, *u.shape[2:])
    cum = la.cumsum(2)  # (B, n, C, *Sa)
    diff = cum.unsqueeze(3) - cum.unsqueeze(2)  # (B, n, Ci, Cj, *Sa)
    causal = torch.ones(C, C, dtype=torch.bool, device=u.device).tril()
    causal = causal.view(1, 1, C, C, *([1] * (la.dim() - 3)))
    W = torch.exp(diff.masked_fill(~causal, float("-inf")))
    h_local = (W * uu.unsqueeze(2)).sum(3)  # (B, n, C, *S)
    if n == 1:
        carry = h0.to(work)[:, None] if h0 is not None else None
    else:
        H = scan_general(cum[:, :, -1], h_local[:, :, -1], h0, chunk)  # (B, n, *S)
        first = h0.to(work)[:, None] if h0 is not None else torch.zeros_like(H[:, :1])
        carry = torch.cat([first, H[:, :-1]], dim=1)
    h = h_local if carry is None else h_local + torch.exp(cum) * carry.unsqueeze(2)
    return h.reshape(B, n * C, *u.shape[2:])[:, :T].to(out_dtype)


def scan_loop(log_a: torch.Tensor, u: torch.Tensor, h0: torch.Tensor | None = None) -> torch.Tensor:
    """Naive sequential recurrence (tests only). log_a broadcastable to u, time on dim 1."""
    log_a = log_a.expand_as(u) if log_a.dim() == u.dim() else log_a.expand(u.shape)
    h = h0.clone() if h0 is not None else torch.zeros_like(u[:, 0])
    out = []
    for t in range(u.shape[1]):
        h = torch.exp(log_a[:, t]) * h + u[:, t]
        out.append(h)
    return torch.stack(out, dim=1)
