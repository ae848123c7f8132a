"""Fast paths: Triton kernels on CUDA, the PyTorch references everywhere else.

``dilated_attention``, ``scan_const_decay``, ``causal_conv_gate`` and ``ssd_scan`` have the same contracts as the
references in ``ionllama.model.dilated_attention`` / ``ionllama.model.scan`` / ``ionllama.model.conv`` /
``ionllama.model.ssm``; they pick the Triton kernel when the inputs are CUDA tensors of a supported dtype and shape
and Triton imports (``ssd_scan``: and nothing needs a gradient), else the reference.
"""
from __future__ import annotations

import contextlib
import os

import torch

from ..model.common import rope_cos_sin
from ..model.conv import causal_conv_gate_reference
from ..model.dilated_attention import dilated_attention_reference, dilated_offsets
from ..model.scan import scan_const_decay as scan_const_decay_reference

_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_TRITON_OK: bool | None = None


@torch.compiler.assume_constant_result  # a compiled caller takes the answer as a constant, no tracing
def triton_available() -> bool:
    global _TRITON_OK
    if _TRITON_OK is None:
        try:
            import triton  # noqa: F401
            from . import conv_gate_triton, dilated_attention_triton, scan_triton, ssd_triton  # noqa: F401  (the custom ops)
            _TRITON_OK = True
        except Exception:  # ImportError, or a broken install
            _TRITON_OK = False
    return _TRITON_OK


def attention_uses_triton(q: torch.Tensor, offsets, segment_ids=None) -> bool:
    """Whether dilated_attention would run the Triton kernel for these inputs."""
    return (q.is_cuda and q.dim() == 4 and q.dtype in _TRITON_DTYPES and 16 <= q.shape[-1] <= 128
            and 0 in [int(o) for o in offsets] and triton_available()
            and (segment_ids is None or segment_ids.shape == (q.shape[0], q.shape[2])))


# The reference paths are not traced by torch.compile: their Python offset lists and chunk loops depend on
# the sequence length and would guard (and recompile) on it. The Triton paths are custom ops (see
# dilated_attention_triton.py): one opaque node each, so a compiled CUDA forward does not break there.
_attention_reference_eager = torch.compiler.disable(dilated_attention_reference)
_scan_reference_eager = torch.compiler.disable(scan_const_decay_reference)


@torch.compiler.disable
def _attention_local_reference_eager(q, k, v, local_width, segment_ids, scale):
    return dilated_attention_reference(q, k, v, dilated_offsets(q.shape[2], local_width), segment_ids, scale)


def dilated_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offsets, segment_ids=None,
                      scale: float | None = None) -> torch.Tensor:
    """Dilated causal attention, q/k/v (B, H, N, Dh): query i sees keys i - o for o in offsets.
    Triton (forward + backward) on CUDA for fp32/bf16/fp16 and head dims 16..128 (padded to a power
    of two inside the kernel) when offsets contain 0; the gather reference otherwise. A negative offset would be a
    key in the future: refused (the kernel read past the sequence's last row for it, the reference raised an
    IndexError)."""
    if any(int(o) < 0 for o in offsets):
        raise ValueError(f"dilated_attention: offsets are distances back and must be >= 0 (got "
                         f"{min(int(o) for o in offsets)}): a negative one would let a query see a later key")
    if 0 not in [int(o) for o in offsets]:  # query 0 would see no key: a softmax over nothing, NaN without a word
        raise ValueError("dilated_attention: offsets must include 0 (each query sees its own key)")
    if attention_uses_triton(q, offsets, segment_ids) and k.dtype == q.dtype and v.dtype == q.dtype:
        from .dilated_attention_triton import dilated_attention_triton
        return dilated_attention_triton(q, k, v, offsets, segment_ids, scale)
    return _attention_reference_eager(q, k, v, offsets, segment_ids, scale)


def dilated_attention_local(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, local_width: int,
                            segment_ids=None, scale: float | None = None) -> torch.Tensor:
    """dilated_attention with offsets = dilated_offsets(N, local_width) ({0..w-1} U {2^k}), computed
    where the kernel runs: the form for compiled callers (the latent transformer)."""
    if local_width < 1:  # offset 0 is what local_width >= 1 gives: without it query 0's row was NaN
        raise ValueError(f"dilated_attention_local: local_width must be >= 1 (got {local_width})")
    if attention_uses_triton(q, [0], segment_ids) and k.dtype == q.dtype and v.dtype == q.dtype:
        from .dilated_attention_triton import dilated_attention_triton
        return dilated_attention_triton(q, k, v, None, segment_ids, scale, local_width=local_width)
    return _attention_local_reference_eager(q, k, v, local_width, segment_ids, scale)


def scan_uses_triton(u: torch.Tensor, log_a: torch.Tensor | None = None) -> bool:
    return (u.is_cuda and u.dim() == 3 and u.dtype in _TRITON_DTYPES and triton_available()
            and (log_a is None or (log_a.is_cuda and log_a.dim() == 1)))


def scan_const_decay(u: torch.Tensor, log_a: torch.Tensor, h0: torch.Tensor | None = None,
                     chunk: int = 64) -> torch.Tensor:
    """h_t = exp(log_a) * h_{t-1} + u_t; u (B, T, D), log_a (D,) <= 0, h0 (B, D) or None.
    Triton (one pass over u, forward + backward) on CUDA; the chunked reference (``chunk``) elsewhere."""
    if scan_uses_triton(u, log_a):
        from .scan_triton import scan_const_decay_triton
        return scan_const_decay_triton(u, log_a, h0)
    return _scan_reference_eager(u, log_a, h0, chunk=chunk)


def conv_gate_uses_triton(x: torch.Tensor) -> bool:
    return x.is_cuda and x.dim() == 3 and x.shape[-1] % 2 == 0 and x.dtype in _TRITON_DTYPES and triton_available()


def causal_conv_gate(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """sigmoid(g) * c with (g, c) = causal depthwise conv of x (B, T, 2D) (weight (2D, k), bias (2D,)):
    IntegralLNN's scan input. Triton (forward + backward, u never leaves the kernel but as the output) on
    CUDA; the shifted-product reference elsewhere (plain ops: torch.compile traces it). Both take weight and
    bias cast to x's dtype, as the reference conv does."""
    if conv_gate_uses_triton(x):
        from .conv_gate_triton import conv_gate_triton
        return conv_gate_triton(x, weight.to(x.dtype), bias.to(x.dtype))
    return causal_conv_gate_reference(x, weight, bias)


# The Mamba-2 scan's kernel is on by default since its check passed on an H200 (selfcheck kind "ssd_scan") and it
# took the two-stage training step 32.6 -> 29.8 ms (docs/results/train-profile.md, thirteenth session).
# IONLLAMA_SSD_SCAN=0 in the environment, or this set to False before the model runs, takes the reference (A/B runs).
SSD_SCAN_KERNEL = os.environ.get("IONLLAMA_SSD_SCAN", "1") != "0"


def needs_grad(*tensors) -> bool:
    """Would autograd record an op on these (grad mode on and one of them requires grad)? None entries skipped."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# Head (P) and state (N) widths where the kernel is used: the entropy model's 16 x 16 (and 8 x 4). MambaByte's 64 x 64
# passes its GPU check too, but is slower there: its no-grad forward at 8 x 8192 took 158.4 ms with the kernel against
# 132.3 ms with the reference (H200, benchmarks/bench_ssd_forward.py, docs/results/kernels.md, fourteenth session).
SSD_KERNEL_MAX_DIM = 32


def ssd_uses_triton(x: torch.Tensor, *others) -> bool:
    """The Mamba-2 scan's Triton kernel is forward only: CUDA, and no input that needs a gradient; others are
    (log_a, B, C, h0) as ssd_scan takes them, B and C of width <= SSD_KERNEL_MAX_DIM as x's heads."""
    widths = [x.shape[-1]] + [t.shape[-1] for t in others[1:3] if t is not None]
    # x.numel() < 2^31: the kernel's input offsets are 32-bit program-id products (b * stride; audit note)
    return (SSD_SCAN_KERNEL and x.is_cuda and x.dim() == 4 and x.dtype in _TRITON_DTYPES
            and max(widths) <= SSD_KERNEL_MAX_DIM and x.numel() < 2**31 and triton_available()
            and not needs_grad(x, *others))


def ssd_scan(x: torch.Tensor, log_a: torch.Tensor, Bm: torch.Tensor, Cm: torch.Tensor, chunk: int = 64,
             h0: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``ionllama.model.ssm.ssd_chunked``'s contract (x (b, T, H, P) scaled by dt, log_a (b, T, H), B / C (b, T, N),
    h0 (b, H, P, N) or None -> y in x's dtype, the final state in fp32 or wider). Where nothing needs a gradient on
    CUDA (the frozen entropy model: stage A, evaluation, prefill), one Triton kernel that keeps each chunk in
    registers (ssd_triton.py; SSD_SCAN_KERNEL switches it off); elsewhere the chunked reference (plain ops,
    differentiable)."""
    if ssd_uses_triton(x, log_a, Bm, Cm, h0) and max(x.shape[-1], Bm.shape[-1]) <= 128:  # (the kernel's own limit)
        from .ssd_triton import ssd_scan_fwd
        return ssd_scan_fwd(x, log_a, Bm, Cm, h0, int(chunk))
    from ..model.ssm import ssd_chunked
    return ssd_chunked(x, log_a, Bm, Cm, chunk, h0)


def rope_table_uses_op(positions: torch.Tensor) -> bool:
    return positions.is_cuda


def rope_cos_sin_table(positions: torch.Tensor, head_dim: int, base: float = 10000.0):
    """RoPE (cos, sin) of ``positions`` (ionllama.model.common.rope_cos_sin), for callers that share one table
    across layers: on CUDA through an opaque custom op (rope_table.py: torch.compile then stores the table
    once instead of recomputing pow/cos/sin inside every layer's rotation), the plain function elsewhere."""
    if rope_table_uses_op(positions):
        from .rope_table import rope_cos_sin_op
        return rope_cos_sin_op(positions, head_dim, float(base))
    return rope_cos_sin(positions, head_dim, base)


@contextlib.contextmanager
def forced_routing(use_triton: bool):
    """For checks and benchmarks: the dispatchers pick the Triton custom ops (True) or the eager references
    (False) for every input (the RoPE table too: its op is plain PyTorch). On CPU the Triton path needs
    TRITON_INTERPRET=1 (set before triton is imported)."""
    global attention_uses_triton, scan_uses_triton, conv_gate_uses_triton, rope_table_uses_op, ssd_uses_triton
    saved = attention_uses_triton, scan_uses_triton, conv_gate_uses_triton, rope_table_uses_op, ssd_uses_triton
    attention_uses_triton = scan_uses_triton = conv_gate_uses_triton = rope_table_uses_op = lambda *a: use_triton
    # the SSM scan kernel is forward only: forced on, it still leaves inputs that need a gradient to the reference
    ssd_uses_triton = lambda x, *o: use_triton and not needs_grad(x, *o)  # noqa: E731
    try:
        yield
    finally:
        attention_uses_triton, scan_uses_triton, conv_gate_uses_triton, rope_table_uses_op, ssd_uses_triton = saved


__all__ = ["dilated_attention", "dilated_attention_local", "scan_const_decay", "causal_conv_gate", "triton_available",
           "attention_uses_triton", "scan_uses_triton", "conv_gate_uses_triton", "rope_cos_sin_table",
           "rope_table_uses_op", "ssd_scan", "ssd_uses_triton", "forced_routing"]
