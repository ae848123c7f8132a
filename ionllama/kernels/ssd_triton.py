"""The selective-SSM scan of the Mamba-2 blocks (``ionllama.model.ssm.ssd_chunked``) as one Triton kernel, forward
only: for the frozen entropy model (stage A of the two-stage training step, evaluation, a decoder's prefill), where
nothing needs its gradient.

Why: ``ssd_chunked`` is exact and O(T), but as PyTorch ops it writes its per-chunk tensors to memory: the decay and
score matrices (L x L per chunk, L x L x H with the heads), the chunk states, all in fp32. For the entropy model
(H = 16 heads of P = 16 channels, state N = 16) at the Phase-1 shape (64 rows of 1,024 bytes) that is hundreds of
MB per block for a 278K-parameter model; in the twelfth session's 7-minute run the entropy model alone trained at
3.26 MB/s, and entropy patching's step was 8 ms slower than fixed patching's, its stage A running the entropy
model's forward eagerly.

Here one program owns one (row, head) and walks its time chunks of L steps, the state (P x N, fp32) in registers:
  cum   = cumsum(log_a) over the chunk                              (L,)
  y     = ((C B^T) * exp(cum_i - cum_j) [i >= j]) @ x               (L, L) @ (L, P)   the chunk's own inputs
        + (C @ state^T) * exp(cum)                                  (L, N) @ (N, P)   the state entering it
  state = exp(cum_L) state + (x * exp(cum_L - cum))^T @ B           (P, L) @ (L, N)
the same algebra as ``ssd_chunked`` (its docstring), every matmul a ``tl.dot`` in fp32 ("ieee": no TF32), so
results agree to fp32 rounding; nothing but x, log_a, B, C is read and y and the final state written. Padded steps
(T not a multiple of L) have log_a = 0 and x = 0: decay 1, no input, the state unchanged.

The oracle is ``ssd_chunked``; checked by ``ionllama.kernels.selfcheck`` kind "ssd_scan" (Triton's interpreter
on CPU, the GPU with --device cuda; passed on an H200 in the thirteenth session). On by default
(``ionllama.kernels.SSD_SCAN_KERNEL``; IONLLAMA_SSD_SCAN=0 takes the reference): the two-stage training step at the
Phase-1 shape went 32.6 -> 29.8 ms with it (docs/results/train-profile.md).
"""
from __future__ import annotations

from typing import Optional  # custom-op schemas: the spelling every supported torch version parses

import torch
import triton
import triton.language as tl


@triton.jit
def _ssd_fwd(x_ptr, la_ptr, b_ptr, c_ptr, h0_ptr, y_ptr, hT_ptr, T,
             sx_b, sx_t, sx_h, sla_b, sla_t, sb_b, sb_t, sc_b, sc_t, sy_b, sy_t, sy_h, sh_b, sh_h,
             P: tl.constexpr, N: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
             L: tl.constexpr, HAS_H0: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    rl = tl.arange(0, L)
    rp = tl.arange(0, BP)
    rn = tl.arange(0, BN)
    mp = rp < P
    mn = rn < N
    causal = rl[:, None] >= rl[None, :]
    s_off = b * sh_b + h * sh_h + rp[:, None] * N + rn[None, :]  # state (b, H, P, N), contiguous in (P, N)
    if HAS_H0:
        state = tl.load(h0_ptr + s_off, mask=mp[:, None] & mn[None, :], other=0.0).to(tl.float32)
    else:
        state = tl.zeros((BP, BN), dtype=tl.float32)
    for c0 in range(0, T, L):
        t = c0 + rl
        mt = t < T
        x = tl.load(x_ptr + b * sx_b + t[:, None] * sx_t + h * sx_h + rp[None, :],
                    mask=mt[:, None] & mp[None, :], other=0.0).to(tl.float32)  # (L, BP)
        la = tl.load(la_ptr + b * sla_b + t * sla_t + h, mask=mt, other=0.0).to(tl.float32)  # (L,)
        bm = tl.load(b_ptr + b * sb_b + t[:, None] * sb_t + rn[None, :], mask=mt[:, None] & mn[None, :],
                     other=0.0).to(tl.float32)  # (L, BN)
        cm = tl.load(c_ptr + b * sc_b + t[:, None] * sc_t + rn[None, :], mask=mt[:, None] & mn[None, :],
                     other=0.0).to(tl.float32)  # (L, BN)
        cum = tl.cumsum(la, 0)
        total = tl.sum(la, 0)
        scores = tl.dot(cm, tl.trans(bm), input_precision="ieee")  # (L, L): C_i . B_j
        decay = tl.where(causal, tl.exp(tl.where(causal, cum[:, None] - cum[None, :], 0.0)), 0.0)
        y = tl.dot(scores * decay, x, input_precision="ieee")  # (L, BP)
        y += tl.dot(cm, tl.trans(state), input_precision="ieee") * tl.exp(cum)[:, None]
        w = tl.exp(total - cum)  # decay from each step to the chunk's end
        state = state * tl.exp(total) + tl.dot(tl.trans(x * w[:, None]), bm, input_precision="ieee")
        tl.store(y_ptr + b * sy_b + t[:, None] * sy_t + h * sy_h + rp[None, :], y.to(y_ptr.dtype.element_ty),
                 mask=mt[:, None] & mp[None, :])
    tl.store(hT_ptr + s_off, state, mask=mp[:, None] & mn[None, :])


def _block(n: int) -> int:
    return max(16, triton.next_power_of_2(n))  # tl.dot's operands are at least 16 wide


def ssd_forward(x: torch.Tensor, log_a: torch.Tensor, Bm: torch.Tensor, Cm: torch.Tensor,
                h0: Optional[torch.Tensor], chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    b, T, H, P = x.shape
    N = Bm.shape[-1]
    x = x if x.stride(-1) == 1 else x.contiguous()
    log_a, Bm, Cm = log_a.contiguous(), Bm.contiguous(), Cm.contiguous()
    work = torch.promote_types(x.dtype, torch.float32)
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    hT = torch.empty(b, H, P, N, device=x.device, dtype=work)
    h0c = h0.to(work).contiguous() if h0 is not None else hT  # (unread without HAS_H0)
    L = max(16, min(triton.next_power_of_2(int(chunk)), 64))
    _ssd_fwd[(b, H)](x, log_a, Bm, Cm, h0c, y, hT, T,
                     x.stride(0), x.stride(1), x.stride(2), log_a.stride(0), log_a.stride(1), Bm.stride(0), Bm.stride(1),
                     Cm.stride(0), Cm.stride(1), y.stride(0), y.stride(1), y.stride(2), hT.stride(0), hT.stride(1),
                     P=P, N=N, BP=_block(P), BN=_block(N), L=L, HAS_H0=h0 is not None, num_warps=4)
    return y, hT


# A custom op, like the other kernels: one opaque node for Dynamo (stage A may be compiled). No autograd: the
# dispatcher (ionllama.kernels.ssd_scan) routes here only when no input needs a gradient.
@torch.library.custom_op("ionllama::ssd_scan_fwd", mutates_args=())
def ssd_scan_fwd(x: torch.Tensor, log_a: torch.Tensor, Bm: torch.Tensor, Cm: torch.Tensor, h0: Optional[torch.Tensor],
                 chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    return ssd_forward(x, log_a, Bm, Cm, h0, chunk)


@ssd_scan_fwd.register_fake
def _(x, log_a, Bm, Cm, h0, chunk):
    b, _, H, P = x.shape
    return x.new_empty(x.shape), x.new_empty((b, H, P, Bm.shape[-1]), dtype=torch.promote_types(x.dtype, torch.float32))
